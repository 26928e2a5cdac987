"""LightningModule for maximum-likelihood training of a :class:`flowforge.flows.model.Flow`.

Loss: mean negative log-likelihood, ``-1/B sum_b log p(x_b)`` in nats for vector data, or mean bits
per dimension for images (``-(log p(y) - D log K) / (D log 2)`` after uniform dequantisation).
Logged: ``{train,val,test}/loss`` plus ``/nll`` (nats per example) and ``/bpd`` (images).

With ``objective`` ``hybrid`` or ``classification`` (Residual Flows, Sec. 6) the flow is wrapped in a
:class:`flowforge.flows.hybrid.HybridClassifier` and the per-example loss is

    L(x, y) = lam * (-log p(x)) + CrossEntropy(logits(x), y)

(``-log p(x)`` in nats, total over the ``D`` dimensions; ``lam`` a number or ``"1/D"``; ``classification``
is ``lam = 0``, where ``nll``/``bpd`` are still logged but carry no gradient).  Also logged: ``/ce`` and
``/acc``.

With ``objective`` ``regression`` (the 1-D fitting experiments of Implicit / Monotone Flows) the flow is used as
a function: batches are ``(y, x)`` (e.g. ``dataset=step1d``), the model maps the input ``x`` through its forward
``z = F(x)`` and the per-example loss is the squared error ``sum_d (z_d - y_d)^2``; ``/mse`` logs the same error
divided by the number of dimensions ``D`` (equal to the loss for 1-D data).  No likelihood is computed.

With ``objective`` ``flow_matching`` (continuous flows only) training minimises the conditional flow-matching loss
``||v(x_t, t) - u_t||^2`` of the model's single CNF (logged as ``train/loss`` and ``train/fm``) and validation / test
evaluate the likelihood through the ODE as under ``mle`` (plus ``/fm``), so bits/dim compare across objectives.

With ``objective`` ``reverse_kl`` the model is fitted to an unnormalised density ``p~`` (``dataset=target``): each
step draws ``n_samples`` (default: the batch size) pathwise samples ``x ~ q`` and minimises the mean of
``log q(x) - log p~(x)`` (``KL(q || p) - log Z``); validation and test also log ``/nll`` on exact target samples
and, from ``eval_samples`` importance samples, ``/log_z`` (``log mean w``, ``w = p~/q``), ``/log_z_se``,
``/log_z_error`` (against the target's exact ``log Z``), ``/elbo`` and ``/ess`` (effective sample size / n).

Continuous flows log ``train/nfe/forward`` and ``train/nfe/backward`` (ODE function evaluations of the step's
forward and backward passes) every step; with RNODE weights (``model.kinetic``, ``model.jacobian``) their
penalty ``kinetic * int ||v||^2 dt + jacobian * int ||J_v||_F^2 dt`` is added to the per-example training loss
and logged as ``train/reg/kinetic`` and ``train/reg/jacobian`` (the unweighted integrals).

Models with implicit blocks (residual inverses, implicit and monotone flows) log
``train/solver/iters/<kind>`` (mean solver iterations per sample of the step's ``forward``, ``inverse`` and
adjoint ``... backward`` solves, averaged over blocks) and ``train/solver/failures`` (unconverged samples
so far) every ``log_every_n_steps`` steps.

Models with spectrally normalised layers get their power iteration run (without gradient) after
every optimizer step (at most ``lipschitz_step_iters`` warm-started iterations when set, for large
convolutional models) and to tolerance before validation and test (``train/max_sigma`` logs the
largest estimated spectral norm before normalisation).  Models whose log-det is a stochastic estimate report
``test/loss_std``: the standard deviation of the test-set mean due to the estimator, from two
independent estimates per test example, ``sqrt(sum_i (a_i - b_i)^2 / 2) / (N sqrt(2))`` for the mean of
the pair (the reported ``test/loss`` is that mean).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import get_total_norm

from flowforge.checks import nonnegative_int, positive_int
from flowforge.errors import ConfigError, ConvergenceError, DataError, NonFiniteLossError
from flowforge.flows.base import samples_pathwise
from flowforge.flows.cnf import clear_step_records, cnf_blocks, cnf_regularization, nfe_summary
from flowforge.flows.contractive_block import clear_solve_records, solver_summary
from flowforge.flows.hybrid import HybridClassifier
from flowforge.flows.model import Flow
from flowforge.nn.lipschitz import lipschitz_layers, update_lipschitz
from flowforge.objectives.flow_matching import flow_matching_flow_loss, single_cnf
from flowforge.objectives.reverse_kl import importance_log_z, reverse_kl_loss
from flowforge.training.faults import locate_nonfinite, nonfinite_tensors
from flowforge.training.objectives import parse_objective

log = logging.getLogger("flowforge")

NONFINITE_POLICIES = ("stop", "skip", "reduce_lr")


class TrainingStopped(Exception):
    """Raised at the end of a batch to end a fit under the ``stop`` fault policy (``experiment.train`` turns it
    into the fault's own error)."""


SOLVER_POLICIES = ("warn", "stop", "skip", "reduce_lr")
POWER_POLICIES = ("warn", "stop", "reduce_lr")


def linear_warmup(step: int, warmup_steps: int) -> float:
    """LR multiplier ``min(1, (step + 1) / warmup_steps)``."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


class FlowModule(pl.LightningModule):
    """Args:
    model: the flow.
    optimizer: a callable ``params -> torch.optim.Optimizer`` (Hydra ``_partial_``).
    warmup_steps: linear learning-rate warm-up length in optimizer steps.
    on_nonfinite: ``stop`` (default: end the run cleanly, weights untouched, last good checkpoint
        kept) or ``skip`` (drop the batch and go on); either way the event is logged and counted.
    config: the resolved run configuration (stored in checkpoints so ``eval.py`` can rebuild the model).
    objective: ``None`` (or ``name: mle``) for maximum likelihood, else the parsed options of the
        objective (:func:`flowforge.training.objectives.parse_objective`; see the module docstring).
    target: the unnormalised density ``objective=reverse_kl`` fits (``dataset=target`` provides it).
    """

    def __init__(
        self,
        model: Flow,
        optimizer: Callable | None = None,
        warmup_steps: int = 0,
        on_nonfinite: str = "stop",
        config: dict | None = None,
        objective: dict | None = None,
        lipschitz_step_iters: int | None = None,
        target: Any | None = None,
        on_solver_failure: str = "warn",
        on_power_iteration_failure: str = "warn",
        fault_lr_factor: float = 0.5,
        max_fault_events: int = 20,
        lipschitz_check_every: int = 1000,
        checkpoint_every: int | None = None,
    ):
        super().__init__()
        if lipschitz_step_iters is not None and (
            isinstance(lipschitz_step_iters, bool)
            or not isinstance(lipschitz_step_iters, int)
            or lipschitz_step_iters < 1
        ):
            raise ConfigError(f"lipschitz_step_iters must be null or a positive integer, got {lipschitz_step_iters!r}")
        self.lipschitz_step_iters = lipschitz_step_iters
        self.lipschitz_check_every = positive_int("lipschitz_check_every", lipschitz_check_every, "1000")
        self.checkpoint_every = checkpoint_every
        for key, value, allowed in (
            ("on_nonfinite", on_nonfinite, NONFINITE_POLICIES),
            ("on_solver_failure", on_solver_failure, SOLVER_POLICIES),
            ("on_power_iteration_failure", on_power_iteration_failure, POWER_POLICIES),
        ):
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got '{value}'")
        if (
            isinstance(fault_lr_factor, bool)
            or not isinstance(fault_lr_factor, (int, float))
            or not 0 < fault_lr_factor < 1
        ):
            raise ConfigError(f"fault_lr_factor must be a number in (0, 1), got {fault_lr_factor!r}")
        if isinstance(max_fault_events, bool) or not isinstance(max_fault_events, int) or max_fault_events < 1:
            raise ConfigError(f"max_fault_events must be a positive integer, got {max_fault_events!r}")
        self.policies = {
            "nonfinite": on_nonfinite,
            "solver": on_solver_failure,
            "power_iteration": on_power_iteration_failure,
        }
        self.fault_lr_factor = float(fault_lr_factor)
        self.max_fault_events = max_fault_events
        nonnegative_int("warmup_steps", warmup_steps, "1000")
        self.model = model
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.warmup_steps = warmup_steps
        self.on_nonfinite = on_nonfinite
        self.save_hyperparameters({"config": config or {}})
        self.fault_events: list[dict] = []
        self.resume_changes: dict[str, Any] = {}  # settings changed on resume (resume_overrides), applied at the start
        self.stop_reason: str | None = None
        self.stop_error: type = NonFiniteLossError
        self._save_on_stop = False
        self._drop_step = False
        self._step_rng: Tensor | None = None
        self._lipschitz_stats: dict = {}
        self.stochastic_logdet = any(
            getattr(getattr(m, "logdet_estimator", None), "stochastic", False) for m in model.modules()
        )
        self._test_noise = torch.zeros(2, dtype=torch.float64)  # [sum (a - b)^2 / 2, count]
        self.objective = parse_objective(objective, model.dim)
        self.target = target
        if self.objective_name == "reverse_kl" and target is None:
            raise ConfigError(
                "objective=reverse_kl fits a flow to an unnormalised target density, but none was given; "
                "use dataset=target (dataset.name=mixture2d, banana or funnel)"
            )
        if self.objective_name == "reverse_kl" and not samples_pathwise(model.transform):
            raise ConfigError(
                "objective=reverse_kl needs samples that are differentiable in the parameters, but this model "
                "inverts some layer without gradient (planar flows invert by bisection); use "
                "model.direction=sampling for planar, or another family"
            )
        if self.objective_name == "flow_matching":
            single_cnf(model)  # a clear error now, not at the first step
        self.classifier: HybridClassifier | None = None
        if self.objective_name in ("hybrid", "classification"):
            self.classifier = HybridClassifier(model, self.objective["num_classes"], self.objective["head_channels"])

    # ------------------------------------------------------------------ objective
    @property
    def objective_name(self) -> str:
        return "mle" if self.objective is None else self.objective["name"]

    def _batch_input(self, batch: Any, stage: str = "train") -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.model.check_input(x)
        if not torch.is_floating_point(x):
            raise DataError(
                f"batch at step {self.global_step} has dtype {x.dtype}, "
                "but flows take real-valued inputs of a floating "
                f"dtype (image pixels as integer-valued floats); convert the data with .float() in the data module"
            )
        if stage != "train" and not torch.isfinite(x).all():
            raise DataError(
                f"{stage} batch contains {int((~torch.isfinite(x)).sum())} NaN/inf values; check the dataset files"
            )
        return x

    def _batch_labels(self, batch: Any) -> Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            dataset = ((self.hparams.get("config") or {}).get("dataset") or {}).get("name") or "this dataset"
            raise ConfigError(
                f"objective={self.objective['name']} needs class labels, but the batches of {dataset} carry "
                f"none; use a labelled dataset such as dataset=digits, mnist or cifar10 (or objective=mle)"
            )
        y = batch[1]
        if torch.is_floating_point(y) or torch.is_complex(y):
            raise DataError(
                f"labels must be integer class indices, got dtype {y.dtype}; store them as int64 (torch.long) "
                f"in the data module"
            )
        n = self.objective["num_classes"]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
            raise ConfigError(
                f"labels range over [{int(y.min())}, {int(y.max())}] but objective.num_classes={n}; "
                f"set objective.num_classes to the dataset's number of classes"
            )
        return y

    def _step_metrics(self, batch: Any, x: Tensor, stage: str = "train") -> dict[str, Tensor]:
        name = self.objective_name
        if name == "regression":
            return self._regression_metrics(batch)
        if name == "reverse_kl":
            return self._reverse_kl_metrics(x, stage)
        if name == "flow_matching":
            fm = flow_matching_flow_loss(self.model, self.model.dequantizer(x)[0] if self.model.is_image else x)
            if stage == "train":
                return {"loss": fm, "fm": fm}
            return {**self.metrics(x), "fm": fm}
        if self.classifier is None:
            return self.metrics(x)
        return self.metrics(x, self._batch_labels(batch))

    def _reverse_kl_metrics(self, x: Tensor, stage: str) -> dict[str, Tensor]:
        """objective=reverse_kl: ``log q(x') - log p~(x')`` for ``n_samples`` draws ``x' ~ q``; outside
        training also ``nll = -log q(x)`` of the batch's exact target samples."""
        n = self.objective["n_samples"] or x.shape[0]
        loss, _, _ = reverse_kl_loss(self.model, self.target, n)
        values = {"loss": loss}
        if stage != "train":
            values["nll"] = -self.model.log_prob(x)
        return values

    def _log_importance(self, stage: str) -> None:
        """Importance-sampling estimates of ``log Z`` and the ESS (objective=reverse_kl, validation / test)."""
        if self.objective_name != "reverse_kl" or self.trainer.sanity_checking:
            return
        with torch.no_grad():
            est = importance_log_z(self.model, self.target, self.objective["eval_samples"])
        values = {"log_z": est["log_z"], "log_z_se": est["log_z_se"], "elbo": est["elbo"], "ess": est["ess_fraction"]}
        if getattr(self.target, "log_z", None) is not None:
            values["log_z_error"] = float(est["log_z"]) - float(self.target.log_z)
        for k, v in values.items():
            self.log(f"{stage}/{k}", float(v), sync_dist=True)

    def _regression_metrics(self, batch: Any) -> dict[str, Tensor]:
        """objective=regression: ``z = F(x)`` for the batch's input ``x = batch[1]``; per-example
        ``loss = sum_d (z_d - y_d)^2`` against the target ``y = batch[0]`` and ``mse = loss / D``."""
        x = batch[1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
        if x is None or not torch.is_floating_point(x) or tuple(x.shape[1:]) != self.model.data_shape:
            dataset = ((self.hparams.get("config") or {}).get("dataset") or {}).get("name") or "this dataset"
            found = "no inputs" if x is None else f"a second tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
            raise ConfigError(
                f"objective=regression needs batches (target y, input x) of real vectors of the model's shape, "
                f"but the batches of {dataset} carry {found}; use dataset=step1d (or objective=mle)"
            )
        z, _ = self.model(x)
        se = (z - batch[0]).pow(2).flatten(1).sum(1)
        return {"loss": se, "mse": se / self.model.dim}

    def metrics(self, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        """Per-example ``nll`` (nats) and, for images, ``bpd``; ``loss`` is the quantity minimised.
        With a hybrid objective ``y`` holds the labels and ``ce`` and ``acc`` join them."""
        if self.classifier is not None:
            return self._hybrid_metrics(x, y)
        if self.model.is_image:
            bpd = self.model.bits_per_dim(x)
            return {"loss": bpd, "bpd": bpd, "nll": bpd * self.model.dim * math.log(2)}
        nll = -self.model.log_prob(x)
        return {"loss": nll, "nll": nll}

    def _hybrid_metrics(self, x: Tensor, y: Tensor | None) -> dict[str, Tensor]:
        if y is None:
            raise ConfigError(f"objective={self.objective['name']} needs labels: call metrics(x, y)")
        model, lam = self.model, self.objective["lam"]
        log_weight: Any = 0.0
        if model.is_image:
            x, log_weight = model.dequantizer(x)
        log_p, logits = self.classifier(x)
        nll = -(log_p + log_weight)
        ce = F.cross_entropy(logits, y, reduction="none")
        if lam == 0:
            nll = nll.detach()
            loss = ce
        else:
            loss = lam * nll + ce
        values = {"loss": loss, "nll": nll}
        if model.is_image:
            values["bpd"] = nll / (model.dim * math.log(2))
        values["ce"] = ce
        values["acc"] = (logits.argmax(1) == y).float()
        return values

    def _log(self, stage: str, values: dict[str, Tensor], batch_size: int) -> None:
        for k, v in values.items():
            self.log(
                f"{stage}/{k}",
                v.mean(),
                on_step=stage == "train",
                on_epoch=True,
                prog_bar=k == "loss",
                sync_dist=stage != "train",
                batch_size=batch_size,
            )

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x = self._batch_input(batch)
        if not torch.isfinite(x).all():
            self._fault(
                "nonfinite",
                f"the training batch contains {int((~torch.isfinite(x)).sum())} NaN/inf values",
                "the data (check the dataset files or the augmentation)",
            )
            return None  # Lightning skips backward and the optimizer step
        values = self._step_metrics(batch, x, "train")
        values.update(self._regularization(values["loss"]))
        loss = values["loss"].mean()
        if not torch.isfinite(loss):
            self._fault(
                "nonfinite", f"the training loss became {float(loss.detach())}", self._locate_loss_fault(batch, x)
            )
            return None
        self._log("train", values, x.shape[0])
        return loss

    def _regularization(self, loss: Tensor) -> dict[str, Tensor]:
        """RNODE: ``{"loss": loss + penalty}`` (per example) when a CNF block of the model recorded a penalty in
        this step's forward (weights ``model.kinetic`` / ``model.jacobian``), else ``{}``; the unweighted
        integrals are logged as ``train/reg/<term>``."""
        penalty = cnf_regularization(self.model)
        if penalty is None:
            return {}
        terms: dict[str, float] = {}
        for block in cnf_blocks(self.model):
            for k, v in block.last_reg_terms.items():
                terms[k] = terms.get(k, 0.0) + float(v)
        for k, v in terms.items():
            self.log(f"train/reg/{k}", v, on_step=True, on_epoch=False)
        return {"loss": loss + penalty}

    # ------------------------------------------------------------------ faults
    @property
    def nonfinite_events(self) -> list[dict]:
        return [e for e in self.fault_events if e["kind"] == "nonfinite"]

    def _fault(self, kind: str, what: str, where: str | None, droppable: bool = True) -> None:
        """Record a fault of ``kind`` (nonfinite, solver, power_iteration) found at this step and apply its policy:
        ``stop`` (end the run after this batch; ``last.ckpt`` is written there), ``skip`` (drop this step's
        update), ``reduce_lr`` (drop it and multiply the learning rates by ``fault_lr_factor``) or ``warn`` (only
        report).  ``droppable=False`` for faults found after the update was applied (power iteration): nothing is
        dropped then.  More than ``max_fault_events`` faults stop the run whatever the policy."""
        configured = self.policies[kind]
        policy = configured
        step = int(self.global_step)
        n = len(self.fault_events) + 1
        escalated = policy != "stop" and n > self.max_fault_events
        if escalated:
            policy = "stop"
        event = {"step": step, "kind": kind, "what": what, "where": where, "policy": policy}
        self.fault_events.append(event)
        count = sum(e["kind"] == kind for e in self.fault_events)
        self.log(f"train/faults/{kind}", float(count), on_step=True, on_epoch=False)
        message = f"{what} at step {step}" + (f" in {where}" if where else "")
        dropped = droppable and policy in ("skip", "reduce_lr", "stop")
        if dropped:
            self._drop_step = True
        if configured == "reduce_lr" and not escalated:
            lrs = self._scale_learning_rates(self.fault_lr_factor)
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

    def _save_at_stop(self, batch: Any) -> None:
        """Write ``last.ckpt`` at a stop, unless the weights are themselves unusable (NaN/inf, or a non-finite loss
        on this batch once any injected fault is undone): a checkpoint saved by a stop always evaluates finite."""
        dirs = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        problem = self._unusable_weights(batch)
        if problem is not None:
            self.stop_reason += (
                f"; {problem}, so no checkpoint was written at the stop (the newest earlier checkpoint may hold them "
                f"too: evaluate it before resuming); lower optim.optimizer.lr or trainer.gradient_clip_val and train "
                f"again"
            )
        elif dirs:
            self.trainer.save_checkpoint(f"{dirs[0]}/last.ckpt")
            self.stop_reason += (
                " and last.ckpt holds the weights after that batch, so a resume continues with the next batch"
            )

    def _unusable_weights(self, batch: Any) -> str | None:
        """Why the current weights cannot be used (NaN/inf entries, or a non-finite loss on ``batch`` replayed from
        the step's random state), or None when they evaluate finite."""
        bad = nonfinite_tensors(self)
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
                loss = self._step_metrics(batch, x, "train")["loss"].mean()
        except (FloatingPointError, ArithmeticError, RuntimeError) as e:
            return f"the weights fail to evaluate the batch ({type(e).__name__}: {str(e)[:200]})"
        finally:
            torch.random.set_rng_state(current)
        if bool(torch.isfinite(loss)):
            return None
        where = self._locate_loss_fault(batch, x)
        return f"the weights themselves give a {float(loss)} loss (first non-finite in {where})"

    def _check_weights_finite(self) -> None:
        """After an update: weights that became NaN/inf cannot be repaired by any policy; the run stops here, before
        a periodic checkpoint could save them."""
        params = [p for p in self.parameters()]
        if not params or bool(torch.isfinite(get_total_norm(params, norm_type=float("inf")))):
            return
        bad = nonfinite_tensors(self)
        lrs = [float(g["lr"]) for opt in self.trainer.optimizers for g in opt.param_groups]
        self.fault_events.append(
            {
                "step": int(self.global_step),
                "kind": "nonfinite",
                "policy": "stop",
                "what": "the weights became NaN/inf in the update",
                "where": bad[0] if bad else None,
            }
        )
        self.stop_error = NonFiniteLossError
        self.stop_reason = (
            f"the weights of {len(bad)} parameter tensors became NaN/inf in the update of step {int(self.global_step)} "
            f"in {bad[0] if bad else '?'} (first) with learning rate {lrs}; no policy can undo an applied update, so "
            f"the run stopped before any checkpoint could save them (the newest checkpoint holds earlier weights); "
            f"lower optim.optimizer.lr or set trainer.gradient_clip_val"
        )
        log.warning(self.stop_reason)
        raise TrainingStopped(self.stop_reason)

    def _scale_learning_rates(self, factor: float) -> list[float]:
        """Multiply every optimizer group's learning rate, and the base rates its scheduler scales, by ``factor``
        (the scheduler's state, checkpointed with it, keeps the reduction)."""
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        lrs = []
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] *= factor
                lrs.append(float(group["lr"]))
        return lrs

    def _locate_loss_fault(self, batch: Any, x: Tensor) -> str | None:
        """Replay the step's forward pass from the random state it started with and name the first module whose
        output was NaN/inf from finite inputs."""
        if self._step_rng is None:
            return None
        current = torch.random.get_rng_state()
        torch.random.set_rng_state(self._step_rng)
        try:
            where = locate_nonfinite(self, lambda: self._step_metrics(batch, x, "train"))
        finally:
            torch.random.set_rng_state(current)
        return where

    def _step_solver_failures(self) -> list[str]:
        """Blocks whose solves of this step (forward, inverse, adjoint) left samples unconverged (one device sync
        for all of them)."""
        records = [
            (name, kind, stats)
            for name, m in self.named_modules()
            if hasattr(getattr(m, "solves", None), "last")
            for kind, stats in m.solves.last.items()
        ]
        if not records:
            return []
        failed = torch.stack([(~stats.converged).any() for _, _, stats in records]).tolist()
        by_block: dict[str, list[str]] = {}
        for (name, kind, _), bad in zip(records, failed):
            if bad:
                by_block.setdefault(name, []).append(kind)
        return [f"{name} ({', '.join(kinds)})" for name, kinds in by_block.items()]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After backward, before the update: NaN/inf gradients under a finite loss (an overflow in a backward pass,
        an adjoint solve that blew up; not checked under ``16-mixed``, whose gradient scaler skips such steps by
        design) and solves of this step that did not converge are faults; a dropped step clears every gradient, so
        the optimizer leaves the weights as they were."""
        if "16-mixed" not in str(self.trainer.precision) or "bf16" in str(self.trainer.precision):
            named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
            # one fused max|g| over all gradients (NaN and inf propagate, finite values cannot overflow), one sync
            if named and not bool(torch.isfinite(get_total_norm([g for _, g in named], norm_type=float("inf")))):
                bad = [n for n, g in named if not bool(torch.isfinite(g).all())]
                self._fault(
                    "nonfinite",
                    f"the gradients of {len(bad)} parameter tensors became NaN/inf with a finite loss",
                    f"{bad[0]} (first)",
                )
        failed = self._step_solver_failures()
        if failed:
            self._fault("solver", "a fixed-point solve did not converge", ", ".join(failed))
        if self._drop_step:
            for group in optimizer.param_groups:
                for q in group["params"]:
                    q.grad = None  # the optimizer skips parameters without gradient: no update at all

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The update, then the power iteration of spectrally normalised layers on the new weights (so every
        checkpoint holds ``u, v, sigma`` consistent with its weights): at most ``lipschitz_step_iters``
        warm-started iterations when set (the subspace carries over, so the estimate keeps converging across
        steps), else to tolerance, where a layer stopped by its iteration cap is a ``power_iteration`` fault."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._check_weights_finite()
        self._lipschitz_stats = update_lipschitz(self.model, max_iters=self.lipschitz_step_iters)
        if self._lipschitz_stats.get("unconverged") and self.lipschitz_step_iters is None:
            self._fault(
                "power_iteration",
                "power iteration stopped at its iteration cap before its tolerance",
                ", ".join(f"model.{n}" for n in self._lipschitz_stats["unconverged"]),
                droppable=False,
            )
        if self.lipschitz_step_iters is not None and self._lipschitz_check_due():
            self._check_lipschitz_guarantee()

    def _lipschitz_check_due(self) -> bool:
        """Every ``lipschitz_check_every`` optimizer steps, and at the steps whose end writes the periodic
        checkpoint (deterministic points, so an interrupted and resumed run checks at the same steps)."""
        done = int(self.global_step) + 1  # (inside the hook global_step still counts the steps before this one)
        at_checkpoint = bool(self.checkpoint_every and done % self.checkpoint_every == 0)
        return done % self.lipschitz_check_every == 0 or at_checkpoint

    def _check_lipschitz_guarantee(self, tolerance: float = 1e-3) -> None:
        """With ``lipschitz_step_iters`` the per-step power iteration is capped, and the norm estimates it leaves can
        lag behind the weights. Run it to tolerance and compare: a layer whose normalised weight had a true norm above
        ``coeff`` (so its residual block may not have been invertible) is a ``power_iteration`` fault, handled by
        ``on_power_iteration_failure``; the estimates are then exact again either way."""
        wanted = {id(layer) for layer in lipschitz_layers(self.model)}
        layers = [(name, layer) for name, layer in self.model.named_modules() if id(layer) in wanted]
        with torch.no_grad():
            estimates = {name: float(layer.sigma_hat()) for name, layer in layers}
        update_lipschitz(self.model)
        breaches = []
        for name, layer in layers:
            true_norm = float(layer.sigma) / max(1.0, estimates[name] / layer.coeff)
            if true_norm > layer.coeff * (1 + tolerance):
                breaches.append((name, true_norm, layer.coeff))
        if breaches:
            worst = max(breaches, key=lambda b: b[1] / b[2])
            self._fault(
                "power_iteration",
                f"the Lipschitz bound was exceeded in {len(breaches)} of {len(layers)} layers (worst: true norm "
                f"{worst[1]:.4f} > coeff {worst[2]}; lipschitz_step_iters={self.lipschitz_step_iters} iterations per "
                f"step did not keep up, raise it); the norms are exact again after a power iteration to tolerance",
                ", ".join(f"model.{b[0]}" for b in breaches),
                droppable=False,
            )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._batch_input(batch, "val")
        self._log("val", self._step_metrics(batch, x, "val"), x.shape[0])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x = self._batch_input(batch, "test")
        values = self._step_metrics(batch, x, "test")
        if self.stochastic_logdet:
            again = self._step_metrics(batch, x, "test")
            diff = (values["loss"] - again["loss"]).double()
            self._test_noise += torch.stack([diff.pow(2).sum().cpu() / 2, torch.tensor(float(x.shape[0]))])
            values = {k: (v + again[k]) / 2 for k, v in values.items()}
        self._log("test", values, x.shape[0])

    # ------------------------------------------------------------------ Lipschitz constraint
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        clear_solve_records(self.model)
        clear_step_records(self.model)
        self._drop_step = False
        self._step_rng = torch.random.get_rng_state()  # to replay the step when its loss is not finite

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._save_on_stop:
            # at this batch boundary, and before Lightning's end-of-run validation could overwrite last.ckpt with an
            # end-of-epoch state (which would make a resume skip the rest of the epoch): save, then end the fit
            self._save_on_stop = False
            self._save_at_stop(batch)
            raise TrainingStopped(self.stop_reason)
        stats, self._lipschitz_stats = self._lipschitz_stats, {}
        if stats:
            self.log("train/max_sigma", stats["max_sigma"], on_step=True, on_epoch=False)
        for key, value in nfe_summary(self.model).items():
            self.log(f"train/{key}", float(value), on_step=True, on_epoch=False)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:  # (reading the stats syncs the device)
            for key, value in solver_summary(self.model).items():
                self.log(f"train/solver/{key}", value, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self) -> None:
        stats = update_lipschitz(self.model)
        if stats.get("unconverged") and not self.trainer.sanity_checking:
            log.warning(
                "power iteration before validation at step %d stopped at its cap before its tolerance in %s; "
                "the Lipschitz bound of those layers may be exceeded (raise model.sn_max_iters)",
                self.global_step,
                ", ".join(f"model.{n}" for n in stats["unconverged"]),
            )

    def on_validation_epoch_end(self) -> None:
        self._log_importance("val")

    def on_test_epoch_start(self) -> None:
        update_lipschitz(self.model)
        self._test_noise.zero_()

    def on_test_epoch_end(self) -> None:
        self._log_importance("test")
        if not self.stochastic_logdet:
            return
        noise = self.trainer.strategy.reduce(self._test_noise.to(self.device), reduce_op="sum")
        var_sum, n = float(noise[0]), float(noise[1])
        if n > 0:
            self.log("test/loss_std", math.sqrt(var_sum) / (n * math.sqrt(2)), sync_dist=False)

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Also store the power-iteration subspaces of the spectrally normalised layers (kept outside the state
        dict, see :meth:`flowforge.nn.lipschitz.LipschitzLayer._block_iterate`) that are valid for their current
        ``v``, so a resumed run warm-starts exactly as the uninterrupted one would."""
        subspaces = {}
        for name, layer in self.named_modules():
            cache = layer.__dict__.get("_subspace") if hasattr(layer, "power_iteration") else None
            if cache is not None and cache[0] == (layer.v.data_ptr(), layer.v._version):
                subspaces[name] = cache[1].detach().cpu()
        checkpoint["lipschitz_subspaces"] = subspaces

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_subspaces = checkpoint.get("lipschitz_subspaces") or {}

    def _apply_resume_changes(self) -> None:
        """Optimizer settings changed on resume (``resume_overrides``): Lightning has just restored the old ones with
        the optimizer state, so set the new ones in every parameter group (a learning rate also as the scheduler's
        base rate, the warm-up factor applied)."""
        for key, value in self.resume_changes.items():
            if not key.startswith("optim.optimizer.") or key.count(".") != 2:
                continue
            name = key.rsplit(".", 1)[1]
            for opt in self.trainer.optimizers:
                for group in opt.param_groups:
                    if name in group:
                        group[name] = tuple(value) if isinstance(group[name], tuple) else value
            if name == "lr":
                for config in self.trainer.lr_scheduler_configs:
                    sched = config.scheduler
                    sched.base_lrs = [float(value)] * len(sched.base_lrs)
                    for group, fn in zip(sched.optimizer.param_groups, getattr(sched, "lr_lambdas", [])):
                        group["lr"] = float(value) * fn(sched.last_epoch)
            log.warning("resume: %s = %r applied to the optimizer", key, value)

    def on_train_start(self) -> None:
        self._apply_resume_changes()
        pending, self._pending_subspaces = getattr(self, "_pending_subspaces", {}), {}
        for name, basis in pending.items():  # after every load (the EMA callback reloads the raw weights last)
            layer = self.get_submodule(name)
            layer.__dict__["_subspace"] = ((layer.v.data_ptr(), layer.v._version), basis.to(layer.v.device))

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(linear_warmup, warmup_steps=self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
