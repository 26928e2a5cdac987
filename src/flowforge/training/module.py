"""LightningModule that trains a :class:`flowforge.flows.model.Flow` under an objective.

What is minimised, and what is logged beside it as ``{train,val,test}/<key>``, is the objective's
(:mod:`flowforge.training.objectives`; maximum likelihood by default: ``/loss``, ``/nll`` in nats per example and
``/bpd`` for images).  Continuous flows also log ``train/nfe/forward`` and ``train/nfe/backward`` (ODE function
evaluations of the step) and, with RNODE weights, add their penalty to the training loss
(:mod:`flowforge.training.regularization`; ``train/reg/<term>`` logs the unweighted integrals).  Models with
implicit blocks log ``train/solver/iters/<kind>`` and ``train/solver/failures`` every ``log_every_n_steps`` steps.
Models whose log-det is a stochastic estimate report ``test/loss_std``, the standard deviation of the test-set
mean due to the estimator (:mod:`flowforge.training.estimator_noise`; ``test/loss`` is the mean of two estimates).

Faults of a step (non-finite values, unconverged solves) go to the
:class:`~flowforge.training.fault_policy.FaultPolicy` callback and the power iteration of spectrally normalised
layers is the :class:`~flowforge.training.lipschitz_maintenance.LipschitzMaintenance` callback's; both get the
``on_after_optimizer_step(trainer, module)`` hook, called after every update.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from flowforge.checks import nonnegative_int
from flowforge.flows.cnf import clear_step_records, nfe_summary
from flowforge.flows.contractive_block import clear_solve_records, solver_summary
from flowforge.flows.model import Flow
from flowforge.training.batches import batch_input
from flowforge.training.estimator_noise import EstimatorNoise
from flowforge.training.fault_policy import FaultPolicy, nonfinite_step
from flowforge.training.lipschitz_maintenance import LipschitzMaintenance
from flowforge.training.objectives import Objective, make_objective
from flowforge.training.regularization import rnode_penalty
from flowforge.training.resume import apply_resume_changes


def linear_warmup(step: int, warmup_steps: int) -> float:
    """LR multiplier ``min(1, (step + 1) / warmup_steps)``."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


class FlowModule(pl.LightningModule):
    """Args:
    model: the flow.
    optimizer: a callable ``params -> torch.optim.Optimizer`` (Hydra ``_partial_``).
    warmup_steps: linear learning-rate warm-up length in optimizer steps.
    config: the resolved run configuration (stored in checkpoints so ``eval.py`` can rebuild the model).
    objective: an :class:`~flowforge.training.objectives.Objective`, its config (with ``_target_``, or a ``name``),
        or None for maximum likelihood.
    target: the unnormalised density ``objective=reverse_kl`` fits (``dataset=target`` provides it).
    callbacks: what training this module needs besides the trainer's own callbacks (``configure_callbacks``):
        by default a :class:`FaultPolicy` and a :class:`LipschitzMaintenance` with their defaults.
    """

    def __init__(
        self,
        model: Flow,
        optimizer: Callable | None = None,
        warmup_steps: int = 0,
        config: dict | None = None,
        objective: Objective | dict | None = None,
        target: Any | None = None,
        callbacks: list[pl.Callback] | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.warmup_steps = nonnegative_int("warmup_steps", warmup_steps, "1000")
        self.save_hyperparameters({"config": config or {}})
        self.objective = make_objective(objective).bind(model, config, target)
        self.classifier = self.objective.classifier  # (a submodule: its heads train with the flow)
        self.fault_events: list[dict] = []  # faults found in this run (FaultPolicy, SampleFigures)
        self.resume_changes: dict[str, Any] = {}  # settings changed on resume (resume_overrides), applied at start
        self.stochastic_logdet = any(
            getattr(getattr(m, "logdet_estimator", None), "stochastic", False) for m in model.modules()
        )
        self._test_noise = EstimatorNoise()
        self._callbacks = [FaultPolicy(), LipschitzMaintenance()] if callbacks is None else list(callbacks)

    # ------------------------------------------------------------------ forward and metrics
    def forward(self, x: Tensor) -> Tensor:
        """``log p(x)`` per example."""
        return self.model.log_prob(x)

    def batch_input(self, batch: Any, stage: str = "train") -> Tensor:
        return batch_input(self.model, batch, stage, self.global_step)

    def metrics(self, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        """Per-example likelihood metrics of ``x`` (with labels ``y`` under a hybrid objective)."""
        return self.objective.metrics(x, y)

    def step_metrics(self, batch: Any, x: Tensor, stage: str = "train") -> dict[str, Tensor]:
        """The objective's per-example values of ``batch`` (``"loss"`` is minimised)."""
        return self.objective.loss(batch, x, stage)

    def _log(self, stage: str, values: dict[str, Tensor], batch_size: int) -> None:
        for k, v in values.items():
            train = stage == "train"
            self.log(
                f"{stage}/{k}",
                v.mean(),
                on_step=train,
                on_epoch=True,
                prog_bar=k == "loss",
                sync_dist=not train,
                batch_size=batch_size,
            )

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x = self.batch_input(batch)
        if not torch.isfinite(x).all():
            nonfinite_step(self, batch, x)
            return None  # Lightning skips backward and the optimizer step
        values = self.step_metrics(batch, x, "train")
        penalty, terms = rnode_penalty(self.model)
        for k, v in terms.items():
            self.log(f"train/reg/{k}", v, on_step=True, on_epoch=False)
        if penalty is not None:
            values["loss"] = values["loss"] + penalty
        loss = values["loss"].mean()
        if not torch.isfinite(loss):
            nonfinite_step(self, batch, x, loss)
            return None
        self._log("train", values, x.shape[0])
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The update, then the callbacks' ``on_after_optimizer_step`` (weight checks, power iteration)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        for callback in self.trainer.callbacks:
            hook = getattr(callback, "on_after_optimizer_step", None)
            if hook is not None:
                hook(self.trainer, self)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self.batch_input(batch, "val")
        self._log("val", self.step_metrics(batch, x, "val"), x.shape[0])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x = self.batch_input(batch, "test")
        values = self.step_metrics(batch, x, "test")
        if self.stochastic_logdet:
            values = self._test_noise.pair(values, self.step_metrics(batch, x, "test"))
        self._log("test", values, x.shape[0])

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        clear_solve_records(self.model)
        clear_step_records(self.model)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for key, value in nfe_summary(self.model).items():
            self.log(f"train/{key}", float(value), on_step=True, on_epoch=False)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:  # (reading the stats syncs the device)
            for key, value in solver_summary(self.model).items():
                self.log(f"train/solver/{key}", value, on_step=True, on_epoch=False)

    def _evaluate(self, stage: str) -> None:
        if not self.trainer.sanity_checking:
            for key, value in self.objective.evaluate(stage).items():
                self.log(f"{stage}/{key}", value, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_start(self) -> None:
        self._test_noise.reset()

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")
        if self.stochastic_logdet:
            std = self._test_noise.std(
                self.trainer.strategy.reduce(self._test_noise.sums.to(self.device), reduce_op="sum")
            )
            if std is not None:
                self.log("test/loss_std", std, sync_dist=False)

    def on_train_start(self) -> None:
        apply_resume_changes(self.trainer, self.resume_changes)

    def configure_callbacks(self) -> list[pl.Callback]:
        return self._callbacks

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(linear_warmup, warmup_steps=self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
