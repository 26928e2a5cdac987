"""No host reads in a training step: every model config's training loss traces under
``torch.compile(fullgraph=True)`` (forward and backward, through AOTAutograd), except where a solver's
data-dependent loop or the roulette draw makes that impossible by design; those configs name the place.  Blocks whose
g is a Lipschitz MLP on vectors run the hand-written Neumann route eagerly between compiled pieces (a graph break,
not a host read); the test names that place too and then traces the autograd route whole.

Also: :func:`flowforge.flows.initialize` and the host-side ``_ready`` flag of data-initialised layers.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch._dynamo as dynamo
from conftest import FAMILIES, MODELS, SMALL, compose, instantiate_model

from flowforge.estimators.roulette import RouletteDistribution
from flowforge.flows import ActNorm, initialize
from flowforge.training.objectives.base import likelihood_metrics

MANIFOLD_DATASETS = {"sphere": "vmf_sphere", "simplex": "dirichlet_simplex"}
CASES = (
    [(m, "toy2d") for m in MODELS if not FAMILIES[m].manifold]
    + [(m, "digits") for m in MODELS if FAMILIES[m].images]
    + [(m, MANIFOLD_DATASETS[FAMILIES[m].manifold]) for m in MODELS if FAMILIES[m].manifold in MANIFOLD_DATASETS]
)

# The one place each exempt config cannot trace, by design: (where the first graph break must be, why).
ODE_SOLVE = (
    ("torchdiffeq/", "flows/cnf.py", "estimators/trace.py"),
    "the torchdiffeq solve (CNF._solve): its step grid and input checks read the time tensor on the host, "
    "and the divergence is an autograd.grad inside the ODE function",
)
FIXED_POINT = (
    ("flowforge/solvers/",),
    "the fixed-point solve (flowforge.solvers): it iterates until each sample converges, a data-dependent loop",
)
ROULETTE = (
    ("RouletteDistribution.sample", "estimators/roulette.py"),
    "the roulette draw (RouletteDistribution.sample): the number of series terms is drawn on the host and "
    "shapes the graph",
)
FUSED_NEUMANN = (
    ("_planned_neumann_logdet",),
    "the hand-written Neumann log-det of a Lipschitz MLP (flowforge.estimators.neumann_mlp), run eagerly between "
    "compiled pieces: its autograd function keeps Python state per call, and eagerly it costs less than the "
    "compiled autograd route",
)
VMF_NORMALIZER = (
    ("flows/manifold_distributions.py",),
    "the von Mises-Fisher log-normaliser: its continued fraction's length follows the learned concentration",
)


def exemption(model: str, dataset: str) -> tuple[tuple[str, ...], str] | None:
    if model == "cnf":
        return ODE_SOLVE
    if model == "sphere":
        return VMF_NORMALIZER
    if model in ("impflow", "monotone"):
        return FIXED_POINT
    if model in ("resflow", "iresnet") and dataset != "toy2d":  # 2-D data takes the exact log-det
        return ROULETTE
    return None


def uses_roulette(flow) -> bool:
    return any(getattr(getattr(m, "logdet_estimator", None), "name", None) == "roulette" for m in flow.modules())


def fused_estimators(flow) -> list:
    """The block estimators that take the hand-written Neumann route where g allows it."""
    estimators = [getattr(m, "logdet_estimator", None) for m in flow.modules()]
    return [e for e in estimators if e is not None and getattr(e, "fused", False) and e.neumann_grad]


def _batch(flow, dataset: str, n: int = 16) -> torch.Tensor:
    shape = flow.data_shape
    if flow.is_image:  # integer pixel levels, dequantised by the model as in training
        return torch.randint(0, flow.dequantizer.num_levels, (n, *shape)).float()
    x = torch.randn(n, *shape)
    if dataset == "vmf_sphere":
        return torch.nn.functional.normalize(x, dim=-1)
    if dataset == "dirichlet_simplex":
        return torch.softmax(x, dim=-1)
    return x


def _training_loss(model: str, dataset: str, monkeypatch):
    # IAF's density inverts each layer in D sequential passes, all traced: one layer of 64 passes traces the same code
    # as two (the 2-D case covers the layer-to-layer path) in half the time
    extra = ["model.num_layers=1"] if model == "iaf" and dataset == "digits" else []
    cfg = compose([f"model={model}", f"dataset={dataset}", *SMALL[model], *extra])
    flow = instantiate_model(cfg)
    x = _batch(flow, dataset)
    flow.train()
    initialize(flow, x, run=lambda x: likelihood_metrics(flow, x))

    def loss_fn(x):
        return likelihood_metrics(flow, x)["loss"].mean()

    return flow, x, loss_fn


def _first_break(loss_fn, x) -> str:
    """The error of a ``fullgraph=True`` compile: the reason and the innermost frame of user code."""
    dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    message = str(info.value)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', message)
    return message.split("from user code")[0].split("User Stack")[0] + (" at " + ":".join(frames[-1]) if frames else "")


@pytest.mark.parametrize("model,dataset", CASES, ids=[f"{m}-{d}" for m, d in CASES])
@pytest.mark.slow
def test_training_step_traces_without_host_reads(model, dataset, monkeypatch):
    """The training loss of every config compiles with ``fullgraph=True`` and its backward runs.  An exempt config's
    first graph break is its named place; the roulette draw, fixed in the test, then traces (so for resflow and
    iresnet the next break is the hand-written Neumann route of their MLP blocks, and with that route off nothing
    else breaks; for the implicit families the next break is their solve)."""
    flow, x, loss_fn = _training_loss(model, dataset, monkeypatch)
    exempt = exemption(model, dataset)
    if uses_roulette(flow) and exempt is not ROULETTE:
        monkeypatch.setattr(RouletteDistribution, "sample", lambda self: 3)  # ROULETTE is tested on its own
    if exempt is not None:
        places, why = exempt
        found = _first_break(loss_fn, x)
        assert any(p in found for p in places), f"{model} on {dataset} breaks the graph outside {why}: {found}"
        if exempt is not ROULETTE:
            return
        monkeypatch.setattr(RouletteDistribution, "sample", lambda self: 3)
        if fused_estimators(flow):  # blocks on vectors with an MLP g take the hand-written route, run eagerly
            places, why = FUSED_NEUMANN
            found = _first_break(loss_fn, x)
            assert any(p in found for p in places), f"{model} on {dataset} breaks the graph outside {why}: {found}"
            for estimator in fused_estimators(flow):  # the autograd route then traces whole
                monkeypatch.setattr(estimator, "fused", False)
    dynamo.reset()
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for p in flow.parameters())


def test_initialize_runs_the_data_init_once_and_keeps_the_random_streams():
    torch.manual_seed(1)
    layer = ActNorm((3,))
    x = torch.randn(64, 3) * 4 + 2
    assert layer._ready is False
    state = torch.get_rng_state()
    initialize(layer, x, run=lambda x: layer(x))
    assert torch.equal(torch.get_rng_state(), state)
    assert layer._ready and float(layer.initialized) == 1.0
    z, _ = layer(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    before = layer.loc.detach().clone()
    initialize(layer, x + 10, run=lambda x: layer(x))  # nothing pending: no second init
    assert torch.equal(layer.loc, before)
    assert layer.training  # the mode is restored


def test_ready_flag_follows_loaded_state_and_reverse_kl_skip():
    from flowforge.objectives.reverse_kl import skip_data_init

    done = ActNorm((2,))
    done(torch.randn(32, 2))
    fresh = ActNorm((2,))
    fresh.load_state_dict(done.state_dict())
    assert fresh._ready
    done.load_state_dict(ActNorm((2,)).state_dict())  # an uninitialised state initialises again
    assert not done._ready
    skip_data_init(done)
    assert done._ready and float(done.initialized) == 1.0


def test_fresh_model_still_initialises_itself_on_its_first_forward():
    """Plain PyTorch use (no explicit initialize): the first forward runs the data init."""
    layer = ActNorm((2,))
    z, _ = layer(torch.randn(32, 2) * 3 + 1)
    assert layer._ready
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- compile=true
def _module(model: str, dataset: str, compile: bool):
    from flowforge.experiment import build

    cfg = compose([f"model={model}", f"dataset={dataset}", *SMALL[model], f"compile={str(compile).lower()}"])
    _, module = build(cfg)
    return module


def test_compiled_and_eager_training_losses_agree(monkeypatch):
    """The same module state and random streams give the same training values compiled (inductor) and eagerly;
    the first batch's data init runs eagerly before either.  (Inductor draws random numbers from its own generator,
    seeded from torch's; ``fallback_random`` makes it draw torch's numbers, so the two match exactly.)"""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch.manual_seed(0)
    module = _module("glow", "digits", compile=True)
    x = torch.randint(0, module.model.dequantizer.num_levels, (16, *module.model.data_shape)).float()
    module.model.train()
    module.initialize(x, x)
    assert module._data_init_done and not [m for m in module.model.modules() if getattr(m, "_ready", True) is False]
    dynamo.reset()
    dynamo.utils.counters.clear()
    torch.manual_seed(3)
    compiled = module.train_values(x, x)["loss"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch.manual_seed(3)
    eager = module.step_metrics(x, x, "train")["loss"]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    compiled.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.model.parameters() if p.grad is not None)


def test_compile_option_must_be_a_boolean():
    from flowforge.errors import ConfigError

    with pytest.raises(ConfigError, match="compile must be true or false, got 'maybe'"):
        _module("realnvp", "toy2d", compile="maybe")


@pytest.mark.slow
def test_train_py_with_compile_true(tmp_path):
    """A short real run with compile=true: finite training, validation and test metrics."""
    import json
    import os

    import forked
    from conftest import ROOT

    args = [
        "train.py",
        "compile=true",
        "smoke=true",
        "trainer.max_steps=3",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = forked.run(args, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] >= 2
    for key in ("train/loss_epoch", "val/loss", "test/loss"):
        assert math.isfinite(metrics[key]), (key, metrics)


def test_refresh_ready_follows_buffers_written_in_place():
    """Weight averaging swaps weights and buffers in place (no state-dict load): refresh_ready re-reads the flags."""
    from flowforge.flows import refresh_ready

    layer = ActNorm((2,))
    layer(torch.randn(32, 2))
    layer.initialized.copy_(torch.tensor(0.0))  # e.g. the not yet initialised averaged copy swapped in
    refresh_ready(layer)
    assert not layer._ready
    layer.initialized.copy_(torch.tensor(0.01))  # an averaged flag above 0 counts as initialised
    refresh_ready(layer)
    assert layer._ready


def test_first_training_batch_runs_the_data_init_eagerly(tmp_path, monkeypatch):
    """compile=false too: the module initialises the model once, on its first training batch, before the step."""
    from conftest import fast_dev_run

    import flowforge.training.module as module_code
    from flowforge.experiment import instantiate

    calls = []
    original = module_code.initialize

    def spy(model, x, run=None):
        calls.append([type(m).__name__ for m in module_code.pending_init(model)])
        return original(model, x, run)

    monkeypatch.setattr(module_code, "initialize", spy)
    cfg = compose(["model=realnvp", "dataset=toy2d", *SMALL["realnvp"], "model.actnorm=true"])
    flow = instantiate_model(cfg)
    fast_dev_run(flow, instantiate(cfg.dataset), tmp_path)
    assert calls and calls[0] and set(calls[0]) == {"ActNorm"}
    assert all(m._ready and float(m.initialized) == 1.0 for m in flow.modules() if isinstance(m, ActNorm))
