"""The fault policy of a training run: what happens when a step goes wrong (the ``faults`` config group).

A fault is found at one optimizer step and has a kind:

- ``nonfinite``: a NaN/inf in the training batch, the loss, the gradients (under a finite loss) or the weights;
- ``solver``: a fixed-point solve of the step (forward, inverse or adjoint) left samples unconverged;
- ``power_iteration``: a power iteration of a spectrally normalised layer stopped at its cap before its tolerance,
  or a Lipschitz bound was found exceeded (:class:`flowforge.training.lipschitz_maintenance.LipschitzMaintenance`).

Each kind has a policy: ``stop`` (end the run after this batch; ``last.ckpt`` holds the weights after it, unless
they are unusable), ``skip`` (drop this step's update), ``reduce_lr`` (drop it and multiply every learning rate by
``fault_lr_factor``) or ``warn`` (only report).  More than ``max_fault_events`` faults stop the run whatever the
policy.  A non-finite loss is located by replaying the step's forward pass from the random state it started with
(:func:`flowforge.training.faults.locate_nonfinite`).  Weights that became NaN/inf in an update stop the run at
once, before any checkpoint could save them.

Every fault is appended to the LightningModule's ``fault_events`` (``{"step", "kind", "what", "where",
"policy"}``) and counted in ``train/faults/<kind>``; a stop ends the fit with :class:`TrainingStopped`, whose
``error`` is the error ``train.py`` reports.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch.nn.utils import get_total_norm

from flowforge.errors import ConfigError, ConvergenceError, NonFiniteLossError
from flowforge.training.faults import locate_nonfinite, nonfinite_tensors
from flowforge.training.solve_records import failed_solves

log = logging.getLogger("flowforge")

NONFINITE_POLICIES = ("stop", "skip", "reduce_lr")
SOLVER_POLICIES = ("warn", "stop", "skip", "reduce_lr")
POWER_POLICIES = ("warn", "stop", "reduce_lr")
#: the keys of the ``faults`` config group that configure :class:`FaultPolicy` (the others inject faults)
POLICY_KEYS = ("on_nonfinite", "on_solver_failure", "on_power_iteration_failure", "fault_lr_factor", "max_fault_events")


class TrainingStopped(Exception):
    """Ends a fit under the ``stop`` policy (``experiment.train`` turns it into ``error(reason)``)."""

    def __init__(self, reason: str, error: type = NonFiniteLossError):
        super().__init__(reason)
        self.reason, self.error = reason, error


class FaultPolicy(pl.Callback):
    """Detects the faults of each training step and applies their policies (module docstring).

    Args:
        on_nonfinite: ``stop``, ``skip`` or ``reduce_lr``.
        on_solver_failure: ``warn``, ``stop``, ``skip`` or ``reduce_lr``.
        on_power_iteration_failure: ``warn``, ``stop`` or ``reduce_lr`` (the update is applied by then).
        fault_lr_factor: the learning-rate factor of ``reduce_lr``, in (0, 1).
        max_fault_events: more faults than this stop the run.
    """

    def __init__(
        self,
        on_nonfinite: str = "stop",
        on_solver_failure: str = "warn",
        on_power_iteration_failure: str = "warn",
        fault_lr_factor: float = 0.5,
        max_fault_events: int = 20,
    ):
        for key, value, allowed in (
            ("on_nonfinite", on_nonfinite, NONFINITE_POLICIES),
            ("on_solver_failure", on_solver_failure, SOLVER_POLICIES),
            ("on_power_iteration_failure", on_power_iteration_failure, POWER_POLICIES),
        ):
            if value not in allowed:
                raise ConfigError(f"faults.{key} must be one of {allowed}, got '{value}'")
        if (
            isinstance(fault_lr_factor, bool)
            or not isinstance(fault_lr_factor, (int, float))
            or not 0 < fault_lr_factor < 1
        ):
            raise ConfigError(f"faults.fault_lr_factor must be a number in (0, 1), got {fault_lr_factor!r}")
        if isinstance(max_fault_events, bool) or not isinstance(max_fault_events, int) or max_fault_events < 1:
            raise ConfigError(f"faults.max_fault_events must be a positive integer, got {max_fault_events!r}")
        self.policies = {
            "nonfinite": on_nonfinite,
            "solver": on_solver_failure,
            "power_iteration": on_power_iteration_failure,
        }
        self.fault_lr_factor = float(fault_lr_factor)
        self.max_fault_events = max_fault_events
        self.stop_reason: str | None = None
        self.stop_error: type = NonFiniteLossError
        self._save_on_stop = False
        self._drop_step = False
        self._step_rng: torch.Tensor | None = None

    # ------------------------------------------------------------------ reports
    def fault(self, pl_module: pl.LightningModule, kind: str, what: str, where: str | None, droppable=True) -> None:
        """Record a fault of ``kind`` found at this step and apply its policy.  ``droppable=False`` for faults found
        after the update was applied (power iteration): nothing is dropped then."""
        configured = self.policies[kind]
        policy = configured
        step = int(pl_module.global_step)
        events = pl_module.fault_events
        n = len(events) + 1
        escalated = policy != "stop" and n > self.max_fault_events
        if escalated:
            policy = "stop"
        events.append({"step": step, "kind": kind, "what": what, "where": where, "policy": policy})
        count = sum(e["kind"] == kind for e in events)
        pl_module.log(f"train/faults/{kind}", float(count), on_step=True, on_epoch=False)
        message = f"{what} at step {step}" + (f" in {where}" if where else "")
        dropped = droppable and policy in ("skip", "reduce_lr", "stop")
        if dropped:
            self._drop_step = True
        if configured == "reduce_lr" and not escalated:
            lrs = self._scale_learning_rates(pl_module.trainer, self.fault_lr_factor)
            message += f"; {'update dropped, ' if dropped else ''}learning rate now {lrs}"
        elif dropped and policy == "skip":
            message += "; update dropped"
        key = "on_nonfinite" if kind == "nonfinite" else f"on_{kind}_failure"
        log.warning(
            "%s (%s=%s%s)",
            message,
            key,
            configured,
            f", stopping: fault number {n} > max_fault_events" if escalated else "",
        )
        if policy == "stop" and self.stop_reason is None:
            self.stop_error = NonFiniteLossError if kind == "nonfinite" else ConvergenceError
            cause = (
                f"that is fault number {n} (max_fault_events={self.max_fault_events})"
                if escalated
                else f"policy {key}=stop"
            )
            state = "the update of that step was dropped" if dropped else "the update of that step was applied"
            self.stop_reason = f"{message}; the run stopped ({cause}); {state}"
            self._save_on_stop = True

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._drop_step = False
        self._step_rng = torch.random.get_rng_state()  # to replay the step when its loss is not finite

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """After backward, before the update: NaN/inf gradients under a finite loss (an overflow in a backward pass,
        an adjoint solve that blew up; not checked under ``16-mixed``, whose gradient scaler skips such steps by
        design) and solves of this step that did not converge are faults; a dropped step clears every gradient, so
        the optimizer leaves the weights as they were."""
        if "16-mixed" not in str(trainer.precision) or "bf16" in str(trainer.precision):
            named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
            # one fused max|g| over all gradients (NaN and inf propagate, finite values cannot overflow), one sync
            if named and not bool(torch.isfinite(get_total_norm([g for _, g in named], norm_type=float("inf")))):
                bad = [n for n, g in named if not bool(torch.isfinite(g).all())]
                self.fault(
                    pl_module,
                    "nonfinite",
                    f"the gradients of {len(bad)} parameter tensors became NaN/inf with a finite loss",
                    f"{bad[0]} (first)",
                )
        failed = failed_solves(pl_module)
        if failed:
            self.fault(pl_module, "solver", "a fixed-point solve did not converge", ", ".join(failed))
        if self._drop_step:
            for group in optimizer.param_groups:
                for q in group["params"]:
                    q.grad = None  # the optimizer skips parameters without gradient: no update at all

    def on_after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After an update (called by :meth:`FlowModule.optimizer_step`): weights that became NaN/inf cannot be
        repaired by any policy; the run stops here, before a periodic checkpoint could save them."""
        params = list(pl_module.parameters())
        if not params or bool(torch.isfinite(get_total_norm(params, norm_type=float("inf")))):
            return
        bad = nonfinite_tensors(pl_module)
        lrs = [float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
        step = int(pl_module.global_step)
        where = bad[0] if bad else None
        pl_module.fault_events.append(
            {
                "step": step,
                "kind": "nonfinite",
                "policy": "stop",
                "what": "the weights became NaN/inf in the update",
                "where": where,
            }
        )
        self.stop_error = NonFiniteLossError
        self.stop_reason = (
            f"the weights of {len(bad)} parameter tensors became NaN/inf in the update of step {step} "
            f"in {where or '?'} (first) with learning rate {lrs}; no policy can undo an applied update, so "
            f"the run stopped before any checkpoint could save them (the newest checkpoint holds earlier weights); "
            f"lower optim.optimizer.lr or set trainer.gradient_clip_val"
        )
        log.warning(self.stop_reason)
        raise TrainingStopped(self.stop_reason, self.stop_error)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """A stop: at this batch boundary, and before Lightning's end-of-run validation could overwrite last.ckpt
        with an end-of-epoch state (which would make a resume skip the rest of the epoch), save, then end the
        fit."""
        if self._save_on_stop:
            self._save_on_stop = False
            self._save_at_stop(trainer, pl_module, batch)
            raise TrainingStopped(self.stop_reason, self.stop_error)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _scale_learning_rates(trainer: pl.Trainer, factor: float) -> list[float]:
        """Multiply every optimizer group's learning rate, and the base rates its scheduler scales, by ``factor``
        (the scheduler's state, checkpointed with it, keeps the reduction)."""
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        lrs = []
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] *= factor
                lrs.append(float(group["lr"]))
        return lrs

    def locate(self, pl_module: pl.LightningModule, batch: Any, x: torch.Tensor) -> str | None:
        """Replay the step's forward pass from the random state it started with and name the first module whose
        output was NaN/inf from finite inputs."""
        if self._step_rng is None:
            return None
        current = torch.random.get_rng_state()
        torch.random.set_rng_state(self._step_rng)
        try:
            return locate_nonfinite(pl_module, lambda: pl_module.step_metrics(batch, x, "train"))
        finally:
            torch.random.set_rng_state(current)

    def _save_at_stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Write ``last.ckpt`` at a stop, unless the weights are themselves unusable (NaN/inf, or a non-finite loss
        on this batch once any injected fault is undone): a checkpoint saved by a stop always evaluates finite."""
        dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        problem = self._unusable_weights(pl_module, batch)
        if problem is not None:
            self.stop_reason += (
                f"; {problem}, so no checkpoint was written at the stop (the newest earlier checkpoint may hold them "
                f"too: evaluate it before resuming); lower optim.optimizer.lr or trainer.gradient_clip_val and train "
                f"again"
            )
        elif dirs:
            trainer.save_checkpoint(f"{dirs[0]}/last.ckpt")
            self.stop_reason += (
                " and last.ckpt holds the weights after that batch, so a resume continues with the next batch"
            )

    def _unusable_weights(self, pl_module: pl.LightningModule, batch: Any) -> str | None:
        """Why the current weights cannot be used (NaN/inf entries, or a non-finite loss on ``batch`` replayed from
        the step's random state), or None when they evaluate finite."""
        bad = nonfinite_tensors(pl_module)
        if bad:
            return f"the weights hold NaN/inf values ({bad[0]} first)"
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not bool(torch.isfinite(x).all()):
            return None  # (the fault was in the data: nothing to evaluate the weights on)
        current = torch.random.get_rng_state()
        if self._step_rng is not None:
            torch.random.set_rng_state(self._step_rng)
        try:
            with torch.no_grad():
                loss = pl_module.step_metrics(batch, x, "train")["loss"].mean()
        except (FloatingPointError, ArithmeticError, RuntimeError) as e:
            return f"the weights fail to evaluate the batch ({type(e).__name__}: {str(e)[:200]})"
        finally:
            torch.random.set_rng_state(current)
        if bool(torch.isfinite(loss)):
            return None
        where = self.locate(pl_module, batch, x)
        return f"the weights themselves give a {float(loss)} loss (first non-finite in {where})"


def fault_policy(trainer: pl.Trainer | None) -> FaultPolicy | None:
    """The run's :class:`FaultPolicy` callback, or None."""
    callbacks = getattr(trainer, "callbacks", None) or []
    return next((cb for cb in callbacks if isinstance(cb, FaultPolicy)), None)


def report_fault(pl_module: pl.LightningModule, kind: str, what: str, where: str | None, droppable=True) -> None:
    """Hand a fault to the run's :class:`FaultPolicy`; without one, a non-finite value ends the fit with a
    :class:`NonFiniteLossError` and other faults are logged as warnings."""
    policy = fault_policy(getattr(pl_module, "_trainer", None))
    if policy is not None:
        policy.fault(pl_module, kind, what, where, droppable)
        return
    message = f"{what} at step {int(pl_module.global_step)}" + (f" in {where}" if where else "")
    if kind == "nonfinite":
        raise NonFiniteLossError(message)
    log.warning(message)


def nonfinite_step(pl_module: pl.LightningModule, batch: Any, x: torch.Tensor, loss: torch.Tensor | None = None):
    """A training step that is not taken: its batch ``x`` holds NaN/inf values, or (``loss`` given) its loss is
    NaN/inf, located by replaying the step (with the run's :class:`FaultPolicy`)."""
    if loss is None:
        what = f"the training batch contains {int((~torch.isfinite(x)).sum())} NaN/inf values"
        where = "the data (check the dataset files or the augmentation)"
    else:
        policy = fault_policy(getattr(pl_module, "_trainer", None))
        what, where = f"the training loss became {float(loss.detach())}", policy and policy.locate(pl_module, batch, x)
    report_fault(pl_module, "nonfinite", what, where)
