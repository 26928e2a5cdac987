"""Every model config runs on CUDA tensors without a GPU: parameters, buffers and inputs are FakeTensors
(``torch._subclasses.fake_tensor``) on ``cuda``, so a tensor created on the CPU inside a forward, an inverse or a
sampler fails here rather than on a user's first GPU run.

A :class:`DeviceWatch` dispatch mode sees every aten op of the call and fails it on

* a CPU tensor that meets a device tensor (``torch.tensor(2.0)`` or ``torch.zeros(n)`` without ``device=``, a
  tensor kept as a plain attribute so ``.to`` did not move it), except a fill of a device tensor with a CPU
  scalar (``x[i:j] = 2.0``, no copy);
* a CPU tensor copied to the device (``torch.tensor(list, device=...)``, ``cpu_tensor.to(device)``: a blocking
  transfer) or a device tensor copied to the host (``.cpu()``, ``.tolist()``);
* a device tensor read on the host (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``) and an op whose output
  shape depends on device values (``nonzero()``, boolean-mask indexing).

Ops on CPU tensors alone run for real (host code such as the roulette's host RNG draw sees real values).

Host syncs by design (a solver's loop, a data check) are listed in ``EXEMPT``: test case -> {function: (why,
replay)}, the function being the innermost flowforge frame (for a backward run by the autograd engine inside a
library, that library's entry point).  ``replay`` answers a listed read so the rest of the call is still checked
(a listed data-dependent selection selects everything ``SELECT_ALL`` times per call, then nothing, so a solver's
loop runs a few full iterations and ends); ``STOP`` ends the call there.  A sync anywhere else fails, and so
does a listed function that no call needed (a stale entry).

The model is built on the CPU as usual and moved with ``Module._apply``, the method behind ``.to("cuda")``
(``Module.to`` itself cannot swap fake parameters in), so only registered parameters and buffers move, as on
a GPU.  The calls run outside ``torch.device("cuda")``: under that context ``torch.zeros(n)`` would land on
the device and hide the bug.  The backward cannot run on fake CUDA tensors without a CUDA driver (the
autograd engine sets up CUDA streams), so the training step with ``.backward()`` runs on fake ``meta`` tensors,
which fail the same way on a CPU tensor.  bf16 autocast runs with device type cuda (``torch.autocast``
switches itself off when CUDA is unavailable, so the test patches the availability checks) and proves it is
active: a matmul inside the context returns bfloat16.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, MODELS, SMALL, compose, instantiate_model
from torch._subclasses.fake_tensor import (
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SRC = str(Path(__file__).resolve().parents[1] / "src" / "flowforge")
aten = torch.ops.aten

# the datasets each config runs on: toy2d for vector families, digits for image families, the manifold
# families on their own datasets
MANIFOLD_DATASETS = {"sphere": "vmf_sphere", "simplex": "dirichlet_simplex"}
CASES = []
for _m in MODELS:
    _f = FAMILIES[_m]
    if _f.manifold:
        CASES.append((_m, MANIFOLD_DATASETS[_f.manifold]))
    else:
        CASES.append((_m, "toy2d"))
        if _f.images:
            CASES.append((_m, "digits"))
IDS = [f"{m}-{d}" for m, d in CASES]

#: replay marker: a host sync in this function ends the call (the rest of that call is not checked)
STOP = "stop"

# host syncs by design: test case -> {function: (why, replay)} (see the module docstring)
_MANIFOLD_CHECK = {
    "flowforge.flows.manifold_flow.check_on_manifold": (
        "every batch is checked to lie on the manifold (a DataError names the first bad example)",
        False,
    )
}
_FIXED_POINT = {
    "flowforge.solvers.iteration.iterate": (
        "a fixed-point solver's loop: each sample iterates until its own residual meets the tolerance",
        True,
    ),
    "flowforge.solvers.stats.SolverStats.num_failed": (
        "the failure policy (on_fail) counts the samples whose solve did not converge",
        0,
    ),
}
_BROYDEN = {
    "flowforge.solvers.broyden.Broyden.next": (
        "Broyden's update forgets the memory of samples whose residual blew up (checked each iteration)",
        False,
    )
}
_CNF = {
    "flowforge.flows.cnf.CNF._solve": (
        "the ODE solve: a learned T sets the fixed step, and torchdiffeq counts the steps and walks the time "
        "grid on the host (adaptive solvers choose every step there)",
        1.0,
    ),
    "flowforge.flows.cnf.CNF._solve.<locals>.<genexpr>": (
        "a non-finite end state of the solve raises a clear error",
        True,
    ),
    "torchdiffeq._impl.adjoint.OdeintAdjointMethod.backward": (
        "the adjoint method's backward is another ODE solve, with torchdiffeq's host-side step control",
        1.0,
    ),
}
_SPHERE = {
    "flowforge.flows.manifold_distributions._bessel_terms": (
        "the vMF normaliser's continued fraction has 20 + 6 sqrt(kappa) terms: kappa is read (and checked)",
        1.0,
    ),
    "flowforge.flows.manifold_distributions.VonMisesFisher.sample": (
        "Wood's rejection sampler: kappa is read on the host and each draw repeats until it is accepted",
        STOP,
    ),
}
# by test case (model-dataset): the estimator ``auto`` picks the exact log-det for 2-d data, the roulette
# estimator for images
EXEMPT: dict[str, dict[str, tuple[str, object]]] = {
    "cnf-toy2d": _CNF,
    "cnf-digits": _CNF,
    "sphere-vmf_sphere": {**_MANIFOLD_CHECK, **_SPHERE},
    "simplex-dirichlet_simplex": _MANIFOLD_CHECK,
    "resflow-toy2d": {**_FIXED_POINT},
    "resflow-digits": {**_FIXED_POINT},
    "iresnet-toy2d": {**_FIXED_POINT},
    "iresnet-digits": {**_FIXED_POINT},
    "impflow-toy2d": {**_FIXED_POINT, **_BROYDEN},
    "impflow-digits": {**_FIXED_POINT, **_BROYDEN},
    "monotone-toy2d": {**_FIXED_POINT},
    "monotone-digits": {**_FIXED_POINT},
}


#: listed syncs made only by a backward pass
IN_BACKWARD = {"torchdiffeq._impl.adjoint.OdeintAdjointMethod.backward"}


class ExemptStop(Exception):
    """A listed host sync whose replay is STOP: ends the call."""


class DeviceSyncError(AssertionError):
    """A host-device round trip or a CPU tensor where a device tensor belongs."""


def _describe(frame) -> tuple[str, str]:
    import linecache

    code = frame.f_code
    where = f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"
    line = linecache.getline(code.co_filename, frame.f_lineno).strip()
    return where, f"{Path(code.co_filename).name}:{frame.f_lineno}: {line}"


def _site() -> tuple[str, str]:
    """``(module.function, file:line: code)`` of the innermost flowforge frame of the current stack; without
    one (a backward that the autograd engine runs in a library), of the outermost frame of an installed
    library other than torch and pytest: the library's entry point."""
    outer = None
    left_test = False  # the watch's own frames (this file) come first
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(SRC):
            return _describe(frame)
        if frame.f_code.co_filename == __file__:
            if left_test:  # back in the test that made the call: what lies beyond is the test runner
                break
        else:
            left_test = True
        top = frame.f_globals.get("__name__", "?").split(".")[0]
        if "site-packages" in frame.f_code.co_filename and top not in (
            "torch",
            "_pytest",
            "pytest",
            "pluggy",
            "__main__",
        ):
            outer = frame
        frame = frame.f_back
    return _describe(outer) if outer is not None else ("<unknown>", "")


def _all_true(mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The long indices of every position of ``mask`` (what ``mask.nonzero(as_tuple=True)`` gives for a mask
    of all True), made on its device: the replay of a data-dependent selection in an exempt function."""
    flat = torch.arange(mask.numel(), device=mask.device)
    out = []
    for size in reversed(mask.shape):
        out.append(flat % size)
        flat = flat // size
    return tuple(reversed(out))


def _none_true(mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Empty long indices, one per dimension of ``mask`` (the selection of a mask of all False)."""
    return tuple(torch.zeros(0, dtype=torch.long, device=mask.device) for _ in mask.shape)


def _replace_masks(args, select):
    """``args`` of an index op with every boolean index tensor replaced by ``select(mask)`` indices."""
    indices = []
    for i in args[1]:
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            indices.extend(select(i))
        else:
            indices.append(i)
    return (args[0], indices, *args[2:])


#: replayed selections per call that select everything; later ones select nothing, so that a solver's loop
#: runs a few full iterations (its method's update included) and then ends
SELECT_ALL = 40


class DeviceWatch(TorchDispatchMode):
    """Fails every op that moves data between the host and the device (see the module docstring); reads in
    ``exempt`` functions are recorded in ``hits`` and answered with the listed value (a data-dependent selection
    there selects everything).  Ops on CPU tensors alone run for real, so host code sees real values."""

    def __init__(self, exempt: dict[str, tuple[str, object]] | None = None):
        super().__init__()
        self.exempt = exempt or {}
        self.hits: set[str] = set()
        self.errors: list[str] = []
        self.selections = 0  # replayed data-dependent selections in the current call
        self.low_precision_ops = 0  # ops with a bfloat16/float16 output

    def _sync(self, what: str, func) -> tuple[bool, object]:
        """``(True, replay value)`` in an exempt function; else records the error and raises it."""
        where, line = _site()
        if where in self.exempt:
            self.hits.add(where)
            if self.exempt[where][1] == STOP:
                raise ExemptStop(where)
            return True, self.exempt[where][1]
        msg = f"{what} ({func}) in {where}, {line}"
        self.errors.append(msg)
        raise DeviceSyncError(msg)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = kwargs.get("device")
        if (
            not any(isinstance(t, FakeTensor) for t in tensors)
            and all(t.device.type == "cpu" for t in tensors)
            and (device is None or torch.device(device).type == "cpu")
        ):
            with unset_fake_temporarily():  # host-only work (a host RNG draw): real values, no device involved
                return func(*args, **kwargs)
        on_cpu = [t for t in tensors if t.device.type == "cpu"]
        on_device = [t for t in tensors if t.device.type != "cpu"]
        if func is aten._local_scalar_dense.default:
            return self._sync("a device tensor is read on the host", func)[1]
        scalar_fill = func in (aten.fill_.Tensor, aten.fill.Tensor) and all(t.dim() == 0 for t in on_cpu)
        if on_cpu and on_device and not scalar_fill:
            self._sync("a CPU tensor meets a device tensor", func)
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            self._sync("an output shape depends on device values", func)
            self.selections += 1
            select = _all_true if self.selections <= SELECT_ALL else _none_true
            if func is aten.nonzero.default:
                return torch.stack(select(args[0]), 1)
            if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
                return func(*_replace_masks(args, select), **kwargs)
            raise
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.low_precision_ops += any(t.dtype in (torch.bfloat16, torch.float16) for t in outs)
        if on_device and any(t.device.type == "cpu" for t in outs):
            self._sync("a device tensor is copied to the host", func)
        if on_cpu and not on_device and any(t.device.type != "cpu" for t in outs):
            self._sync("a CPU tensor is copied to the device (a blocking transfer)", func)
        return out


def build(model: str, dataset: str):
    """The model built on the CPU, its spectrally normalised layers initialised there: their first power
    iteration is a convergence loop read on the host by design (on a GPU it runs once, in
    ``flowforge.flows.initialize`` before the first step), so the device calls see initialised layers."""
    from flowforge.nn.lipschitz import update_lipschitz

    cfg = compose([f"model={model}", f"dataset={dataset}", *SMALL[model]])
    flow = instantiate_model(cfg)
    update_lipschitz(flow)
    return flow


def move(flow, mode: FakeTensorMode, device: str):
    """Every parameter and buffer of ``flow`` replaced by a fake tensor on ``device`` (what ``.to`` moves)."""
    with mode:
        flow._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))
    return flow


def data(flow, n: int, device: str):
    """A fake batch on ``device`` shaped like the flow's data, and latents for its inverse."""
    x = torch.rand(n, *flow.data_shape, device=device)
    z = torch.randn(n, flow.dim, device=device)
    return x, z


def watched(case: str, calls, backward: bool = False) -> DeviceWatch:
    """Run each ``(name, fn)`` of ``calls`` under a :class:`DeviceWatch` with the case's exemptions; fail on any
    unlisted host sync, and on a listed one that no call made (of those of the backward when ``backward``, of
    the others otherwise)."""
    watch = DeviceWatch(EXEMPT.get(case))
    for name, fn in calls:
        watch.selections = 0
        try:
            with watch:
                fn()
        except ExemptStop:
            pass
        except DeviceSyncError as err:
            raise DeviceSyncError(f"{case}: {name}: {err}") from None
    assert not watch.errors, watch.errors
    expected = {f for f in EXEMPT.get(case, ()) if (f in IN_BACKWARD) == backward}
    stale = sorted(expected - watch.hits)
    assert not stale, f"{case}: listed host syncs that no call made (remove them from EXEMPT): {stale}"
    return watch


_DIRICHLET_LIB = None


def _fake_dirichlet_sampler() -> None:
    """A shape-only kernel for ``aten::_sample_dirichlet`` (torch ships none, so fake tensors cannot run
    ``torch.distributions.Dirichlet.sample``); it does not change what real tensors compute."""
    global _DIRICHLET_LIB
    if _DIRICHLET_LIB is None:
        _DIRICHLET_LIB = torch.library.Library("aten", "IMPL")
        _DIRICHLET_LIB.impl("_sample_dirichlet", lambda alpha, generator=None: torch.empty_like(alpha), "Meta")


def calls(flow, x, z):
    """The calls every config must run device-clean: log_prob in train mode (building the graph) and eval mode,
    the inverse of latents, and sampling at temperatures 1 and 0.5."""
    n = x.shape[0]
    device = x.device.type

    def train():
        flow.train()
        lp = flow.log_prob(x)
        assert lp.shape == (n,) and lp.device.type == device and lp.requires_grad

    def evaluate():
        flow.eval()
        with torch.no_grad():
            assert flow.log_prob(x).device.type == device

    def inverse():
        flow.eval()
        with torch.no_grad():
            out = flow.inverse(z)
            assert out.shape == (n, *flow.data_shape) and out.device.type == device

    def sample():
        flow.eval()
        for s in (flow.sample(n), flow.sample(n, temperature=0.5)):
            assert s.shape == (n, *flow.data_shape) and s.device.type == device

    return [("train log_prob", train), ("eval log_prob", evaluate), ("inverse", inverse), ("sample", sample)]


def fake_flow(model: str, dataset: str, device: str):
    """The config's model with fake parameters and buffers on ``device``, its fake mode, a batch and latents."""
    _fake_dirichlet_sampler()
    flow = build(model, dataset)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real CPU tensors meet fake ones only where the watch allows
    move(flow, mode, device)
    with mode:
        x, z = data(flow, 4, device)
    return flow, mode, x, z


@pytest.mark.parametrize("model,dataset", CASES, ids=IDS)
def test_cuda_log_prob_inverse_and_sample(model, dataset):
    """log_prob in train and eval mode, inverse of latents and sampling (T = 1, 0.5) on fake CUDA tensors."""
    flow, mode, x, z = fake_flow(model, dataset, "cuda")
    with mode:
        watched(f"{model}-{dataset}", calls(flow, x, z))


_AUTOCAST = torch.autocast


def _autocast_without_meta(device_type, *args, **kwargs):
    """``torch.autocast``, a no-op on ``meta`` (which has no autocast, so switching it off changes nothing)."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return _AUTOCAST(device_type, *args, **kwargs)


@pytest.mark.parametrize("model,dataset", CASES, ids=IDS)
def test_training_step_with_backward(model, dataset, monkeypatch):
    """The training step, loss.backward() included, on fake tensors.  The autograd engine needs a CUDA driver for
    CUDA tensors, so this runs on ``meta``: a CPU tensor meeting a meta tensor fails just as on CUDA."""
    monkeypatch.setattr(torch, "autocast", _autocast_without_meta)
    flow, mode, x, _ = fake_flow(model, dataset, "meta")
    with mode:

        def step():
            flow.train()
            loss = -flow.log_prob(x).mean()
            loss.backward()

        watched(f"{model}-{dataset}", [("training step", step)], backward=True)
        grads = [p.grad for p in flow.parameters() if p.requires_grad]
        assert any(g is not None for g in grads), "the backward reached no parameter"
        assert all(g.device.type == "meta" for g in grads if g is not None)


#: families in which autocast leaves every op in float32, and why
NO_LOW_PRECISION_OPS = {
    "cnf": "the ODE solve runs with autocast off, in the input's dtype (docs/families.md, flowforge.flows.cnf)",
    "radial": "elementwise maps and reductions only: no op that autocast runs in bf16",
}


@pytest.fixture
def cuda_autocast(monkeypatch):
    """``torch.autocast("cuda")`` active without a GPU: it switches itself off when CUDA is unavailable and
    refuses bf16 when the device cannot tell its support, so both checks answer as on a bf16-capable GPU."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


@pytest.mark.parametrize("model,dataset", CASES, ids=IDS)
def test_bf16_autocast_on_cuda(model, dataset, cuda_autocast):
    """The same calls under ``torch.autocast("cuda", dtype=torch.bfloat16)`` on fake CUDA tensors."""
    flow, mode, x, z = fake_flow(model, dataset, "cuda")
    with mode, torch.autocast("cuda", dtype=torch.bfloat16):
        a = torch.ones(2, 2, device="cuda")
        assert torch.is_autocast_enabled("cuda") and (a @ a).dtype == torch.bfloat16  # autocast is really on
        watch = watched(f"{model}-{dataset}", calls(flow, x, z))
    if model not in NO_LOW_PRECISION_OPS:
        assert watch.low_precision_ops > 0, "autocast changed no op of the model"
