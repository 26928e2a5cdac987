"""Keeping the spectral norms of Lipschitz-constrained layers current during training.

Models with spectrally normalised layers (residual, implicit and monotone flows) estimate each weight's spectral
norm by power iteration.  :class:`LipschitzMaintenance` runs it (without gradient):

- after every optimizer step, on the new weights, so every checkpoint holds ``u, v, sigma`` consistent with its
  weights: at most ``step_iters`` warm-started iterations when set (the subspace carries over, so the estimate keeps
  converging across steps), else to tolerance, where a layer stopped by its iteration cap is a ``power_iteration``
  fault (:class:`flowforge.training.fault_policy.FaultPolicy`);
- with ``step_iters`` set, to tolerance every ``check_every`` steps and before every periodic checkpoint, where a
  layer whose normalised weight had a true norm above its bound ``coeff`` is a ``power_iteration`` fault;
- to tolerance before validation and test.

``train/max_sigma`` logs the largest estimated norm before normalisation.  The warm-start subspaces
(:meth:`flowforge.nn.lipschitz.LipschitzLayer.subspace_state`) are stored in checkpoints under
``"lipschitz_subspaces"``, so a resumed run iterates exactly as the uninterrupted one.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

from flowforge.checks import optional_positive_int, positive_int
from flowforge.errors import ConfigError
from flowforge.nn.lipschitz import (
    UPDATE_METHODS,
    check_init_iters,
    lipschitz_layers,
    set_init_iters,
    update_lipschitz,
)
from flowforge.training.fault_policy import report_fault

log = logging.getLogger("flowforge")

CHECKPOINT_KEY = "lipschitz_subspaces"


class LipschitzMaintenance(pl.Callback):
    """Power iteration of the spectrally normalised layers of ``pl_module.model`` (module docstring).

    Args:
        step_iters: cap on the warm-started iterations after each optimizer step (None: to tolerance).
        step_method: the per-step update of the spectral-norm layers (:func:`flowforge.nn.lipschitz.update_lipschitz`):
            ``subspace`` (block power iteration, its subspace carried from step to step) or ``krylov`` (Lanczos
            from ``v``; one step costs one plain power-iteration step).  The to-tolerance runs (checks,
            validation, test) use ``subspace``.
        check_every: with ``step_iters``, run to tolerance and check the bounds every this many steps.
        checkpoint_every: the periodic checkpoint's interval in steps (the bounds are also checked before it).
        init_iters: cap on the Lanczos steps of each spectral-norm layer's first estimate (None: to tolerance);
            set on the layers when fitting starts (:func:`flowforge.nn.lipschitz.set_init_iters`).
    """

    def __init__(
        self,
        step_iters: int | None = None,
        check_every: int = 1000,
        checkpoint_every: int | None = None,
        step_method: str = "subspace",
        init_iters: int | None = None,
    ):
        if step_method not in UPDATE_METHODS:
            raise ConfigError(
                f"lipschitz_step_method must be one of {', '.join(UPDATE_METHODS)}, got {step_method!r} (subspace: "
                "block power iteration carried across steps; krylov: Lanczos from v, the cost of plain power iteration)"
            )
        self.step_method = step_method
        self.step_iters = optional_positive_int("lipschitz_step_iters", step_iters)
        self.init_iters = check_init_iters(init_iters)
        self.check_every = positive_int("lipschitz_check_every", check_every, "1000")
        self.checkpoint_every = checkpoint_every
        self._stats: dict = {}
        self._pending: dict = {}

    # ------------------------------------------------------------------ training
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first batch (whose forward makes the first estimates): the first estimate's cap."""
        set_init_iters(pl_module.model, self.init_iters)

    def on_after_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After each update (called by :meth:`FlowModule.optimizer_step`)."""
        self._stats = update_lipschitz(pl_module.model, max_iters=self.step_iters, method=self.step_method)
        if self._stats.get("unconverged") and self.step_iters is None:
            report_fault(
                pl_module,
                "power_iteration",
                "power iteration stopped at its iteration cap before its tolerance",
                ", ".join(f"model.{n}" for n in self._stats["unconverged"]),
                droppable=False,
            )
        if self.step_iters is not None and self._check_due(pl_module):
            self.check_guarantee(pl_module)

    def _check_due(self, pl_module: pl.LightningModule) -> bool:
        """Every ``check_every`` optimizer steps, and at the steps whose end writes the periodic checkpoint
        (deterministic points, so an interrupted and resumed run checks at the same steps)."""
        done = int(pl_module.global_step) + 1  # (inside the hook global_step still counts the steps before this one)
        at_checkpoint = bool(self.checkpoint_every and done % self.checkpoint_every == 0)
        return done % self.check_every == 0 or at_checkpoint

    def check_guarantee(self, pl_module: pl.LightningModule, tolerance: float = 1e-3) -> None:
        """With ``step_iters`` the per-step power iteration is capped, and the norm estimates it leaves can lag
        behind the weights.  Run it to tolerance and compare: a layer whose normalised weight had a true norm above
        ``coeff`` (so its residual block may not have been invertible) is a ``power_iteration`` fault; the
        estimates are exact again either way."""
        model = pl_module.model
        wanted = {id(layer) for layer in lipschitz_layers(model)}
        layers = [(name, layer) for name, layer in model.named_modules() if id(layer) in wanted]
        with torch.no_grad():
            estimates = {name: float(layer.sigma_hat()) for name, layer in layers}
        update_lipschitz(model)
        breaches = []
        for name, layer in layers:
            true_norm = float(layer.sigma) / max(1.0, estimates[name] / layer.coeff)
            if true_norm > layer.coeff * (1 + tolerance):
                breaches.append((name, true_norm, layer.coeff))
        if breaches:
            worst = max(breaches, key=lambda b: b[1] / b[2])
            report_fault(
                pl_module,
                "power_iteration",
                f"the Lipschitz bound was exceeded in {len(breaches)} of {len(layers)} layers (worst: true norm "
                f"{worst[1]:.4f} > coeff {worst[2]}; lipschitz_step_iters={self.step_iters} iterations per "
                f"step did not keep up, raise it); the norms are exact again after a power iteration to tolerance",
                ", ".join(f"model.{b[0]}" for b in breaches),
                droppable=False,
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Every step's first forward computes ``sigma_hat``'s direction from the buffers as they are: weight
        averaging writes the evaluation weights in and out through ``.data``, which version counters do not see."""
        _forget(pl_module.model, "forget_sigma_direction")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        stats, self._stats = self._stats, {}
        if stats:
            pl_module.log("train/max_sigma", stats["max_sigma"], on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _forget_subspaces(pl_module.model)
        stats = update_lipschitz(pl_module.model)
        if stats.get("unconverged") and not trainer.sanity_checking:
            log.warning(
                "power iteration before validation at step %d stopped at its cap before its tolerance in %s; "
                "the Lipschitz bound of those layers may be exceeded (raise model.sn_max_iters)",
                pl_module.global_step,
                ", ".join(f"model.{n}" for n in stats["unconverged"]),
            )

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _forget_subspaces(pl_module.model)
        update_lipschitz(pl_module.model)

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Store the warm-start subspaces that belong to the layers' current ``v``."""
        subspaces = {}
        for name, layer in pl_module.named_modules():
            basis = layer.subspace_state() if hasattr(layer, "subspace_state") else None
            if basis is not None:
                subspaces[name] = basis.detach().cpu()
        checkpoint[CHECKPOINT_KEY] = subspaces

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(CHECKPOINT_KEY) or {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the loaded subspaces after every load of the weights (weight averaging reloads the raw weights
        at the start of training)."""
        pending, self._pending = self._pending, {}
        for name, basis in pending.items():
            pl_module.get_submodule(name).load_subspace_state(basis)


def _forget_subspaces(model: torch.nn.Module) -> None:
    """Drop the warm-start subspaces before an evaluation: the weights evaluated may be swapped in (weight
    averaging), and a subspace left from an earlier evaluation of the same tensors would make the result depend
    on the run's history rather than on the checkpointed weights and buffers alone."""
    _forget(model, "forget_subspace", "forget_sigma_direction")


def _forget(model: torch.nn.Module, *methods: str) -> None:
    """Call each named ``forget_*`` method on every normalised layer that has it."""
    for layer in lipschitz_layers(model):
        for name in methods:
            forget = getattr(layer, name, None)
            if forget is not None:
                forget()
