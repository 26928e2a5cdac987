"""LightningModule that trains a :class:`flowforge.flows.model.Flow` under an objective.

What is minimised, and what is logged beside it as ``{train,val,test}/<key>``, is the objective's
(:mod:`flowforge.training.objectives`; maximum likelihood by default: ``/loss``, ``/nll`` in nats per example and
``/bpd`` for images).  Continuous flows also log ``train/nfe/forward`` and ``train/nfe/backward`` (ODE function
evaluations of the step) and, with RNODE weights, add their penalty to the training loss
(:mod:`flowforge.training.regularization`; ``train/reg/<term>`` logs the unweighted integrals).  Models with
implicit blocks log ``train/solver/iters/<kind>`` and ``train/solver/failures`` every ``log_every_n_steps`` steps.
Models whose log-det is a stochastic estimate report ``test/loss_std``, the standard deviation of the test-set
mean due to the estimator (:mod:`flowforge.training.estimator_noise`; ``test/loss`` is the mean of two estimates).
Under DDP, validation and test values are the exact means over the whole split (:class:`ExampleMeans`; each example
is evaluated once, see :class:`flowforge.data.sampler.EvalSampler`) and training values are averaged over the ranks.

Faults of a step (non-finite values, unconverged solves) go to the
:class:`~flowforge.training.fault_policy.FaultPolicy` callback and the power iteration of spectrally normalised
layers is the :class:`~flowforge.training.lipschitz_maintenance.LipschitzMaintenance` callback's; both get the
``on_after_optimizer_step(trainer, module)`` hook, called after every update.

Data-dependent initialisation (ActNorm's statistics, the first power iteration of spectrally normalised layers)
runs once, eagerly, on the first training batch (:func:`flowforge.flows.initialize`, on every DDP process), so no
training forward branches on a device tensor.  With ``compile=True`` the objective's training loss computation (the
model's forward; backward through AOTAutograd) is compiled with ``torch.compile`` after that init; the Lightning
hooks, validation and test stay eager.  The training step then reads two scalars on the host, by design of the fault
policy: whether the batch is finite (a non-finite batch is never fed to the model) and whether the loss is finite
(its update is refused); :class:`~flowforge.training.fault_policy.FaultPolicy` reads one more, the finiteness of the
gradients before the update.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from flowforge.checks import check_schedule, nonnegative_int
from flowforge.errors import ConfigError
from flowforge.flows.base import initialize, pending_init, refresh_ready
from flowforge.flows.cnf import clear_step_records, nfe_summary
from flowforge.flows.contractive_block import clear_solve_records, solver_summary
from flowforge.flows.model import Flow
from flowforge.training.batches import batch_finite, batch_input, nonfinite_values
from flowforge.training.estimator_noise import EstimatorNoise
from flowforge.training.fault_policy import FaultPolicy, nonfinite_step
from flowforge.training.lipschitz_maintenance import LipschitzMaintenance
from flowforge.training.objectives import Objective, make_objective
from flowforge.training.regularization import rnode_penalty
from flowforge.training.resume import apply_resume_changes


class ExampleMeans:
    """Means over all examples of an epoch and all processes, weighted by example, in float64.

    :meth:`add` takes a batch's values: a tensor of per-example values adds its sum and its length; a scalar (a value
    of the batch as a whole) counts as the mean of ``batch_size`` examples.  :meth:`compute` sums the per-process
    sums and counts with ``reduce`` (one collective over ``[sums..., counts...]``) and returns ``sum / count`` per
    key: the mean over the whole split, whatever the number of examples and batches on each process.  Every process
    must call :meth:`compute` at the same point with the same keys (the keys are sorted).
    """

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def add(self, values: dict[str, Tensor], batch_size: int) -> None:
        for key, value in values.items():
            device = "cpu" if value.device.type == "mps" else value.device  # (MPS has no float64)
            value = value.detach().to(device, torch.float64)
            total, n = (value * batch_size, batch_size) if value.ndim == 0 else (value.sum(), value.numel())
            self.sums[key] = self.sums[key] + total if key in self.sums else total
            self.counts[key] = self.counts.get(key, 0) + n

    def compute(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """``{key: sum / count}`` over this process's batches, or with ``reduce`` (a sum over processes) over all
        processes' batches; an empty dict before any :meth:`add`."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        device = self.sums[keys[0]].device
        counts = torch.tensor([float(self.counts[k]) for k in keys], dtype=torch.float64, device=device)
        totals = torch.cat([torch.stack([self.sums[k].to(device) for k in keys]), counts])
        if reduce is not None:
            totals = reduce(totals)
        return {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys)}


#: each FlowModule's compiled training loss (kept outside the module, so copies of it, e.g. for weight averaging,
#: do not copy compiled code)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_compile(value: Any) -> bool:
    """The ``compile`` option: true or false."""
    if not isinstance(value, bool):
        raise ConfigError(
            f"compile must be true or false, got {value!r}; compile=true compiles the training loss with "
            "torch.compile, compile=false (the default) runs it eagerly"
        )
    return value


def linear_warmup(step: int, warmup_steps: int) -> float:
    """LR multiplier ``min(1, (step + 1) / warmup_steps)``."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def lr_multiplier(step: int, warmup_steps: int, schedule: str, total_steps: int, min_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` over the configured one: linear warm-up, then ``constant`` (1) or
    ``cosine`` decay to ``min_ratio`` at ``total_steps`` (Loshchilov & Hutter 2017, without restarts):

        m(t) = r + (1 - r) (1 + cos(pi (t - w) / (T - w))) / 2,   w <= t <= T.
    """
    warm = linear_warmup(step, warmup_steps)
    if schedule == "constant" or step < warmup_steps:
        return warm
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fused_ok(params: Iterable[Tensor], precision: str = "32-true") -> bool:
    """What ``fused: auto`` in an optimizer's arguments resolves to: torch's fused kernels (one per parameter
    tensor, on the CPU and CUDA) unless a parameter lives elsewhere or is not floating point, or the run uses
    mixed precision (``16-mixed``, ``bf16-mixed``): Lightning's mixed-precision plugin refuses to clip the
    gradients of an optimizer that unscales them inside its step, as the fused ones do."""
    params = list(params)
    return (
        bool(params)
        and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        and "mixed" not in precision
        and precision not in ("16", "bf16")
    )


def build_optimizer(factory: Callable, params: Iterable[Tensor], precision: str = "32-true") -> torch.optim.Optimizer:
    """``factory(params)`` with a ``fused="auto"`` argument of a ``functools.partial`` factory (Hydra's
    ``_partial_``) resolved by :func:`fused_ok`."""
    params = list(params)
    if isinstance(factory, partial) and factory.keywords.get("fused") == "auto":
        factory = partial(factory, fused=fused_ok(params, precision))
    return factory(params)


class FlowModule(pl.LightningModule):
    """Args:
    model: the flow.
    optimizer: a callable ``params -> torch.optim.Optimizer`` (Hydra ``_partial_``).
    warmup_steps: linear learning-rate warm-up length in optimizer steps.
    schedule: ``constant`` or ``cosine`` (decay to ``min_lr`` over the run's optimizer steps, after the warm-up).
    config: the resolved run configuration (stored in checkpoints so ``eval.py`` can rebuild the model).
    objective: an :class:`~flowforge.training.objectives.Objective`, its config (with ``_target_``, or a ``name``),
        or None for maximum likelihood.
    target: the unnormalised density ``objective=reverse_kl`` fits (``dataset=target`` provides it).
    callbacks: what training this module needs besides the trainer's own callbacks (``configure_callbacks``):
        by default a :class:`FaultPolicy` and a :class:`LipschitzMaintenance` with their defaults.
    compile: compile the training loss computation with ``torch.compile`` (module docstring).
    """

    def __init__(
        self,
        model: Flow,
        optimizer: Callable | None = None,
        warmup_steps: int = 0,
        schedule: str = "constant",
        min_lr: float = 0.0,
        config: dict | None = None,
        objective: Objective | dict | None = None,
        target: Any | None = None,
        callbacks: list[pl.Callback] | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.compile_loss = check_compile(compile)
        self._data_init_done = False
        self.model = model
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.warmup_steps = nonnegative_int("warmup_steps", warmup_steps, "1000")
        self.schedule, self.min_lr = check_schedule(schedule, min_lr)
        # kept in the checkpoint; the loggers get the resolved run configuration once, from the experiment
        # layer, instead of Lightning writing it again at the start of every fit and test
        self.save_hyperparameters({"config": config or {}}, logger=False)
        self.objective = make_objective(objective).bind(model, config, target)
        self.classifier = self.objective.classifier  # (a submodule: its heads train with the flow)
        self.fault_events: list[dict] = []  # faults found in this run (FaultPolicy, SampleFigures)
        self.resume_changes: dict[str, Any] = {}  # settings changed on resume (resume_overrides), applied at start
        self.stochastic_logdet = any(
            getattr(getattr(m, "logdet_estimator", None), "stochastic", False) for m in model.modules()
        )
        self._test_noise = EstimatorNoise()
        self._eval_means = {"val": ExampleMeans(), "test": ExampleMeans()}
        self._callbacks = [FaultPolicy(), LipschitzMaintenance()] if callbacks is None else list(callbacks)

    # ------------------------------------------------------------------ forward and metrics
    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` per example (``log p(x | c)`` given the raw ``context`` of a conditional model)."""
        return self.model.log_prob(x, context)

    def batch_input(self, batch: Any, stage: str = "train") -> Tensor:
        return batch_input(self.model, batch, stage, self.global_step)

    def metrics(self, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        """Per-example likelihood metrics of ``x`` (with labels ``y`` under a hybrid objective)."""
        return self.objective.metrics(x, y)

    def step_metrics(self, batch: Any, x: Tensor, stage: str = "train") -> dict[str, Tensor]:
        """The objective's per-example values of ``batch`` (``"loss"`` is minimised)."""
        return self.objective.loss(batch, x, stage)

    def initialize(self, batch: Any, x: Tensor) -> None:
        """The model's data-dependent initialisation on the training batch ``x`` (through the objective's loss, so
        each layer sees the data as in training); a no-op once done or when no layer is pending."""
        if pending_init(self.model):
            initialize(self.model, x, run=lambda x: self.objective.loss(batch, x, "train"))
        self._data_init_done = True

    def train_values(self, batch: Any, x: Tensor) -> dict[str, Tensor]:
        """The objective's training values of ``batch``: compiled with ``torch.compile`` when ``compile`` is on."""
        if not self.compile_loss:
            return self.step_metrics(batch, x, "train")
        compiled = _COMPILED.get(self)
        if compiled is None:
            compiled = _COMPILED[self] = torch.compile(self.objective.loss)
        # backward-in-forward (the residual families' mem_eff estimator) calls autograd.grad inside the loss, which
        # AOTAutograd's donated backward buffers refuse ("requires create_graph=False and retain_graph=False")
        with torch._functorch.config.patch(donated_buffer=False):
            return compiled(batch, x, "train")

    def _log(self, stage: str, values: dict[str, Tensor], batch_size: int) -> None:
        """Training: each value's batch mean, as ``train/<key>_step`` and, averaged over the epoch by Lightning,
        ``train/<key>_epoch``; under DDP both are synced (``sync_dist``: one all-reduce per key and step, which
        every rank runs since all take the same number of equal batches), so they are means over all ranks' batches.
        Validation and test: accumulated per example and logged once at the end of the epoch (:meth:`_log_means`)."""
        if stage != "train":
            self._eval_means[stage].add(values, batch_size)
            return
        for k, v in values.items():
            self.log(
                f"{stage}/{k}",
                v.mean(),
                on_step=True,
                on_epoch=True,
                prog_bar=k == "loss",
                sync_dist=True,
                batch_size=batch_size,
            )

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the DDP processes (itself in a single process or outside a trainer)."""
        trainer = self._trainer
        return tensor if trainer is None else trainer.strategy.reduce(tensor, reduce_op="sum")

    def _log_means(self, stage: str) -> None:
        """Log the exact means of the epoch's validation or test values over the whole split: the per-example sums
        and counts of every process, summed over processes (:class:`ExampleMeans`; a single collective at the end
        of the epoch, so ranks with different numbers of batches do not matter)."""
        means = self._eval_means[stage]
        for key, value in means.compute(self._reduce_sum).items():
            # the same value on every rank: sync_dist (a mean of equal values) only marks it as reduced for Lightning
            self.log(f"{stage}/{key}", value, prog_bar=key == "loss", sync_dist=True, batch_size=1)
        means.reset()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x = self.batch_input(batch)
        if not batch_finite(self.model, batch, x):  # host sync: a non-finite batch is never fed to the model
            nonfinite_step(self, batch, nonfinite_values(self.model, batch, x))
            return None  # Lightning skips backward and the optimizer step
        if not self._data_init_done:
            self.initialize(batch, x)
        values = self.train_values(batch, x)
        penalty, terms = rnode_penalty(self.model)
        for k, v in terms.items():
            self.log(f"train/reg/{k}", v, on_step=True, on_epoch=False)
        if penalty is not None:
            values["loss"] = values["loss"] + penalty
        loss = values["loss"].mean()
        if not torch.isfinite(loss):  # host sync: the update of a non-finite loss is refused
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
            # Monte Carlo estimates of the model as a whole (not means over the split): averaged over the processes
            for key, value in self.objective.evaluate(stage).items():
                self.log(f"{stage}/{key}", value, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        refresh_ready(self.model)  # (after a weight-averaging callback swapped its weights in)
        self._eval_means["val"].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_means("val")
        self._evaluate("val")
        refresh_ready(self.model)  # (the trained weights are back)

    def on_test_epoch_start(self) -> None:
        refresh_ready(self.model)
        self._eval_means["test"].reset()
        self._test_noise.reset()

    def on_test_epoch_end(self) -> None:
        self._log_means("test")
        self._evaluate("test")
        if self.stochastic_logdet:
            device = "cpu" if self.device.type == "mps" else self.device
            std = self._test_noise.std(self._reduce_sum(self._test_noise.sums.to(device)))
            if std is not None:  # (the same on every rank, from the summed sums)
                self.log("test/loss_std", std, sync_dist=True, batch_size=1)

    def on_train_start(self) -> None:
        apply_resume_changes(self.trainer, self.resume_changes)
        refresh_ready(self.model)

    def configure_callbacks(self) -> list[pl.Callback]:
        # the trainer keeps them after fit; offering the same instances again for test would only make Lightning
        # warn that they override themselves
        attached = {id(cb) for cb in self._trainer.callbacks} if self._trainer is not None else set()
        return [cb for cb in self._callbacks if id(cb) not in attached]

    def _precision(self) -> str:
        return str(self._trainer.precision) if self._trainer is not None else "32-true"

    def fused_optimizer(self) -> bool:
        """What ``fused: auto`` resolves to in this run (:func:`fused_ok`)."""
        return fused_ok(self.parameters(), self._precision())

    def configure_optimizers(self):
        opt = build_optimizer(self.optimizer_factory, self.parameters(), self._precision())
        total, ratio = 0, 0.0
        if self.schedule == "cosine":
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ConfigError(
                    "optim.schedule=cosine decays over the run's optimizer steps: set trainer.max_epochs or "
                    "trainer.max_steps"
                )
            total = int(total)
            lr = opt.param_groups[0]["lr"]
            if self.min_lr > lr:
                raise ConfigError(f"optim.min_lr={self.min_lr} exceeds the learning rate {lr}; the cosine decays to it")
            ratio = self.min_lr / lr
        multiplier = partial(
            lr_multiplier, warmup_steps=self.warmup_steps, schedule=self.schedule, total_steps=total, min_ratio=ratio
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
