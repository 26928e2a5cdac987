"""Faults during training: where they come from, and a way to cause them on purpose.

:func:`locate_nonfinite` replays a computation with a hook on every submodule (``forward`` and, for flow
transforms, ``inverse``) and names the first module whose inputs were finite but whose output was not:
the layer where a NaN/inf was born.

:class:`FaultInjection` (``+faults.<kind>=<step>`` on the command line, see ``conf/faults/default.yaml``)
causes one fault of each configured kind at a given optimizer step, so that the detection, the report and the
configured policy (``faults.on_nonfinite``, ``faults.on_solver_failure``, ``faults.on_power_iteration_failure``,
:class:`flowforge.training.fault_policy.FaultPolicy`) can be tested end to end, and so that a cluster setup's
kill / pre-emption handling can be rehearsed:

- ``signal`` / ``signal_at_step``: send ``SIGTERM``, ``SIGKILL`` or ``SIGUSR1`` to this process as that step
  starts; ``signal_after_step`` instead sends it once that many steps are done and every step-end hook has run
  (the periodic checkpoint of that step included): at the next validation start or training-epoch end, e.g.
  right after the final step's save;
- ``signal_phase`` (with ``signal``): send it in another phase instead: ``sanity`` (as the sanity check's first
  batch starts), ``validation`` (as the first batch of a validation at or after ``signal_at_step`` starts, 0 when
  unset), ``test`` (as the final test's first batch starts) or ``inside_step`` (inside training step
  ``signal_at_step``, at its :data:`INSIDE_STEP_CALLS`-th module call: mid-solve for a CNF).  Whatever the phase,
  the batches and module calls run after the signal are counted and printed when the run stops
  (``fault injection: after SIGTERM: ...``), so a test can assert how promptly the signal was acted on;
- ``nan_batch``: the batch gets a NaN;
- ``nan_output`` (with ``layer``): that module's output becomes NaN (a NaN loss located at ``layer``);
- ``nan_grad`` (with ``parameter``): that parameter's gradient becomes NaN under a finite loss;
- ``solver_failure`` (with ``layer``): that block's solvers get one iteration and an unreachable tolerance;
- ``power_iteration_failure`` (with ``layer``): that spectrally normalised layer (the first of its group when
  same-shape layers are iterated together) gets one power iteration and an unreachable tolerance;
- ``exploding_inverse`` (with ``layer``): that transform's inverse returns inf (as a divergent inverse does).
"""

from __future__ import annotations

import dataclasses
import os
import signal as signal_module
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.base import Transform
from flowforge.solvers.solver import Solver

SIGNALS = ("SIGTERM", "SIGKILL", "SIGUSR1", "SIGINT")
SIGNAL_PHASES = ("sanity", "validation", "test", "inside_step")
#: ``signal_phase=inside_step``: the signal is sent at this module call of the step (counted from its start)
INSIDE_STEP_CALLS = 10
KINDS = ("nan_batch", "nan_output", "nan_grad", "solver_failure", "power_iteration_failure", "exploding_inverse")


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _finite(obj: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(obj) if t.is_floating_point())


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers that hold NaN/inf values."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def locate_nonfinite(root: nn.Module, run: Callable[[], Any], prefix: str = "") -> str | None:
    """Run ``run()`` (without gradient) watching every submodule of ``root``; return ``"<name> (<Type>)"`` of the
    first module to finish a ``forward`` or ``inverse`` with finite inputs and a NaN/inf output, or None when
    no module did (the fault did not recur, or arose outside any module)."""
    found: list[str] = []
    names = {id(m): (prefix + name) or "<root>" for name, m in root.named_modules()}

    def note(module: nn.Module, inputs: Any, output: Any) -> None:
        if not found and _finite(inputs) and not _finite(output):
            found.append(f"{names[id(module)]} ({type(module).__name__})")

    with ExitStack() as stack:
        for m in root.modules():
            handle = m.register_forward_hook(note)
            stack.callback(handle.remove)
            if isinstance(m, Transform):
                for method in ("inverse", "inverse_and_log_det"):
                    stack.enter_context(_watched(m, method, note))
        with torch.no_grad():
            try:
                run()
            except Exception:  # noqa: BLE001 - the replay only looks for the origin; its own errors do not matter
                pass
    return found[0] if found else None


@contextmanager
def _watched(module: nn.Module, method: str, note: Callable) -> Iterator[None]:
    original = getattr(module, method)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        note(module, args, out)
        return out

    had = method in module.__dict__
    module.__dict__[method] = wrapper
    try:
        yield
    finally:
        if had:
            module.__dict__[method] = original
        else:
            module.__dict__.pop(method, None)


def nonfinite_samples(
    flow: nn.Module, n: int, temperature: float = 1.0, prefix: str = "model."
) -> tuple[int, str | None] | None:
    """None when ``flow.sample(n)`` is finite; else ``(number of NaN/inf values, the module whose inverse produced
    them first or None)``, replayed from the same random state; module names get ``prefix`` (the flow's name in
    the LightningModule, as training faults are reported)."""
    state = torch.random.get_rng_state()
    x = flow.sample(n, temperature=temperature)
    if bool(torch.isfinite(x).all()):
        return None
    torch.random.set_rng_state(state)
    return int((~torch.isfinite(x)).sum()), locate_nonfinite(
        flow, lambda: flow.sample(n, temperature=temperature), prefix
    )


class FaultInjection(pl.Callback):
    """Causes the configured faults (module docstring).  Steps count optimizer steps (``trainer.global_step``
    when the batch starts); ``layer`` / ``parameter`` are names in the LightningModule (e.g.
    ``model.transform.layers.2``, as faults are reported)."""

    def __init__(
        self,
        signal: str | None = None,
        signal_at_step: int | None = None,
        layer: str | None = None,
        parameter: str | None = None,
        signal_after_step: int | None = None,
        signal_phase: str | None = None,
        **at_step: int | None,
    ):
        unknown = sorted(set(at_step) - set(KINDS))
        if unknown:
            raise ConfigError(f"unknown fault kind(s) {unknown}; choose from {list(KINDS)} (or signal/signal_at_step)")
        if signal_phase is not None:
            if signal_phase not in SIGNAL_PHASES:
                raise ConfigError(f"faults.signal_phase must be one of {SIGNAL_PHASES}, got {signal_phase!r}")
            if signal is None or signal_after_step is not None:
                raise ConfigError(
                    "faults.signal_phase needs faults.signal (and no faults.signal_after_step), e.g. "
                    "faults.signal=SIGTERM faults.signal_phase=test"
                )
            if signal_phase == "inside_step" and signal_at_step is None:
                raise ConfigError(
                    "faults.signal_phase=inside_step needs faults.signal_at_step, the training step to interrupt"
                )
        elif (signal is None) != (signal_at_step is None and signal_after_step is None) or (
            signal_at_step is not None and signal_after_step is not None
        ):
            raise ConfigError(
                "faults.signal and faults.signal_at_step go together (or faults.signal and "
                "faults.signal_after_step, not both steps), e.g. faults.signal=SIGKILL "
                "faults.signal_at_step=7"
            )
        if signal is not None and signal not in SIGNALS:
            raise ConfigError(f"faults.signal must be one of {SIGNALS}, got {signal!r}")
        needs = {
            "nan_output": layer,
            "solver_failure": layer,
            "power_iteration_failure": layer,
            "exploding_inverse": layer,
            "nan_grad": parameter,
        }
        for kind, step in at_step.items():
            if step is not None and needs.get(kind, "ok") is None:
                what = "parameter" if kind == "nan_grad" else "layer"
                raise ConfigError(f"faults.{kind} needs faults.{what}: the name of the {what} to break")
        for kind, step in [
            ("signal_at_step", signal_at_step),
            ("signal_after_step", signal_after_step),
            *at_step.items(),
        ]:
            if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
                raise ConfigError(f"faults.{kind} must be an optimizer step (an integer >= 0), got {step!r}")
        self.signal, self.signal_at_step, self.signal_after_step = signal, signal_at_step, signal_after_step
        self.signal_phase = signal_phase
        self.sent = False
        #: what ran after the signal was sent (signal_phase): batches started per stage, module calls
        self.after_signal = {"training batches": 0, "validation batches": 0, "test batches": 0, "module calls": 0}
        self._hooks: list[Any] = []
        self.layer, self.parameter = layer, parameter
        self.at_step = {k: v for k, v in at_step.items() if v is not None}
        self._undo: list[Callable[[], None]] = []
        self.injected: list[tuple[str, int]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the targets now, not when their step comes."""
        if self.layer is not None:
            module = self._module(pl_module)
            checks = {
                "solver_failure": (
                    lambda m: any(isinstance(v, Solver) for v in vars(m).values()),
                    "has no iterative solver (choose an implicit block)",
                ),
                "power_iteration_failure": (
                    lambda m: hasattr(m, "power_iteration"),
                    "is not a spectrally normalised layer",
                ),
                "exploding_inverse": (lambda m: isinstance(m, Transform), "is not a flow transform (no inverse)"),
            }
            for kind, (ok, problem) in checks.items():
                if kind in self.at_step and not ok(module):
                    raise ConfigError(f"faults.layer={self.layer!r} {problem}, but faults.{kind} needs one")
        if self.parameter is not None:
            self._parameter(pl_module)

    def _module(self, pl_module: pl.LightningModule) -> nn.Module:
        try:
            return pl_module.get_submodule(self.layer)
        except AttributeError:
            raise ConfigError(f"faults.layer={self.layer!r} is not a module of this model") from None

    def _parameter(self, pl_module: pl.LightningModule) -> nn.Parameter:
        try:
            return pl_module.get_parameter(self.parameter)
        except AttributeError:
            raise ConfigError(f"faults.parameter={self.parameter!r} is not a parameter of this model") from None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.sent:
            self.after_signal["training batches"] += 1
        if self.signal_phase == "inside_step" and step == self.signal_at_step and not self.sent:
            self._arm_inside_step(pl_module, step)
        elif self.signal is not None and self.signal_phase is None and step == self.signal_at_step:
            self.injected.append((self.signal, step))
            os.kill(os.getpid(), getattr(signal_module, self.signal))
        due = [k for k, s in self.at_step.items() if s == step]
        for kind in due:
            self.injected.append((kind, step))
            getattr(self, f"_inject_{kind}")(pl_module, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._disarm()
        while self._undo:
            self._undo.pop()()

    def _signal_after_step(self, trainer: pl.Trainer) -> None:
        """``signal_after_step``: checkpoint callbacks run last at a batch end, so the signal waits for the
        first hook after it."""
        step = self.signal_after_step
        if step is not None and trainer.global_step >= step and (self.signal, step) not in self.injected:
            self.injected.append((self.signal, step))
            os.kill(os.getpid(), getattr(signal_module, self.signal))

    # ------------------------------------------------------------------ signal_phase
    def _send(self, step: int) -> None:
        self.sent = True
        self.injected.append((self.signal, step))
        os.kill(os.getpid(), getattr(signal_module, self.signal))

    def _arm_inside_step(self, pl_module: pl.LightningModule, step: int) -> None:
        calls = [0]

        def count(module: nn.Module, args: Any) -> None:
            calls[0] += 1
            if self.sent:
                self.after_signal["module calls"] += 1
            elif calls[0] == INSIDE_STEP_CALLS:
                self._send(step)

        self._hooks = [m.register_forward_pre_hook(count) for m in pl_module.modules()]

    def _disarm(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.sent:
            self.after_signal["validation batches"] += 1
        elif self.signal_phase == "sanity" and trainer.sanity_checking:
            self._send(trainer.global_step)
        elif (
            self.signal_phase == "validation"
            and not trainer.sanity_checking
            and trainer.global_step >= (self.signal_at_step or 0)
        ):
            self._send(trainer.global_step)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.sent:
            self.after_signal["test batches"] += 1
        elif self.signal_phase == "test":
            self._send(trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._disarm()
        if self.sent:
            counts = ", ".join(f"{v} {k}" for k, v in self.after_signal.items())
            print(f"fault injection: after {self.signal}: {counts}", flush=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._signal_after_step(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signal_after_step(trainer)

    # ------------------------------------------------------------------ one method per kind
    def _inject_nan_batch(self, pl_module, batch) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x.view(-1)[0] = float("nan")

    def _inject_nan_output(self, pl_module, batch) -> None:
        def hook(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            return (t * float("nan"), *output[1:]) if isinstance(output, tuple) else t * float("nan")

        self._undo.append(self._module(pl_module).register_forward_hook(hook).remove)

    def _inject_nan_grad(self, pl_module, batch) -> None:
        self._undo.append(self._parameter(pl_module).register_hook(lambda g: g * float("nan")).remove)

    def _inject_solver_failure(self, pl_module, batch) -> None:
        module = self._module(pl_module)
        for k, v in {k: v for k, v in vars(module).items() if isinstance(v, Solver)}.items():
            setattr(module, k, dataclasses.replace(v, max_iters=1, fallback_iters=0, atol=1e-300, rtol=0.0))
            self._undo.append(lambda k=k, v=v: setattr(module, k, v))

    def _inject_power_iteration_failure(self, pl_module, batch) -> None:
        module = self._module(pl_module)
        saved = (module.max_iters, module.rtol, module.atol)
        module.max_iters, module.rtol, module.atol = 1, 0.0, 0.0  # (layers iterated as a group use the first's)

        def undo():
            module.max_iters, module.rtol, module.atol = saved

        self._undo.append(undo)

    def _inject_exploding_inverse(self, pl_module, batch) -> None:
        module = self._module(pl_module)
        inverse, inverse_and_log_det = module.inverse, module.inverse_and_log_det

        def exploding(z, *args, **kwargs):
            return inverse(z, *args, **kwargs) * float("inf")

        def exploding_with_log_det(z, *args, **kwargs):
            x, log_det = inverse_and_log_det(z, *args, **kwargs)
            return x * float("inf"), log_det

        module.__dict__["inverse"] = exploding
        module.__dict__["inverse_and_log_det"] = exploding_with_log_det  # the path pathwise sampling takes
        self._undo.append(lambda: [module.__dict__.pop(k, None) for k in ("inverse", "inverse_and_log_det")])
