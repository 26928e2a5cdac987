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

import math
from functools import partial
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import get_total_norm

from flowforge.errors import ConfigError, DataError
from flowforge.flows.base import samples_pathwise
from flowforge.flows.cnf import clear_step_records, cnf_blocks, cnf_regularization, nfe_summary
from flowforge.flows.contractive_block import clear_solve_records, solver_summary
from flowforge.flows.hybrid import HybridClassifier
from flowforge.flows.model import Flow
from flowforge.nn.lipschitz import update_lipschitz
from flowforge.objectives.flow_matching import flow_matching_flow_loss, single_cnf
from flowforge.objectives.reverse_kl import importance_log_z, reverse_kl_loss
from flowforge.training.objectives import parse_objective

NONFINITE_POLICIES = ("stop", "skip")


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
        optimizer: Optional[Callable] = None,
        warmup_steps: int = 0,
        on_nonfinite: str = "stop",
        config: Optional[dict] = None,
        objective: Optional[dict] = None,
        lipschitz_step_iters: Optional[int] = None,
        target: Optional[Any] = None,
    ):
        super().__init__()
        if lipschitz_step_iters is not None and (isinstance(lipschitz_step_iters, bool)
                                                 or not isinstance(lipschitz_step_iters, int) or lipschitz_step_iters < 1):
            raise ConfigError(f"lipschitz_step_iters must be null or a positive integer, got {lipschitz_step_iters!r}")
        self.lipschitz_step_iters = lipschitz_step_iters
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got '{on_nonfinite}'")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.model = model
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.warmup_steps = warmup_steps
        self.on_nonfinite = on_nonfinite
        self.save_hyperparameters({"config": config or {}})
        self.nonfinite_events: list[dict] = []
        self.stop_reason: Optional[str] = None
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
        self.classifier: Optional[HybridClassifier] = None
        if self.objective_name in ("hybrid", "classification"):
            self.classifier = HybridClassifier(
                model, self.objective["num_classes"], self.objective["head_channels"]
            )

    # ------------------------------------------------------------------ objective
    @property
    def objective_name(self) -> str:
        return "mle" if self.objective is None else self.objective["name"]

    def _batch_input(self, batch: Any) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.model.check_input(x)
        if not torch.is_floating_point(x):
            raise DataError(
                f"batch at step {self.global_step} has dtype {x.dtype}, but flows take real-valued inputs of a floating "
                f"dtype (image pixels as integer-valued floats); convert the data with .float() in the data module"
            )
        if not torch.isfinite(x).all():
            raise DataError(
                f"batch at step {self.global_step} contains {int((~torch.isfinite(x)).sum())} NaN/inf values; "
                f"check the dataset files or the augmentation"
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
        values = {"log_z": est["log_z"], "log_z_se": est["log_z_se"], "elbo": est["elbo"],
                  "ess": est["ess_fraction"]}
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

    def metrics(self, x: Tensor, y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Per-example ``nll`` (nats) and, for images, ``bpd``; ``loss`` is the quantity minimised.
        With a hybrid objective ``y`` holds the labels and ``ce`` and ``acc`` join them."""
        if self.classifier is not None:
            return self._hybrid_metrics(x, y)
        if self.model.is_image:
            bpd = self.model.bits_per_dim(x)
            return {"loss": bpd, "bpd": bpd, "nll": bpd * self.model.dim * math.log(2)}
        nll = -self.model.log_prob(x)
        return {"loss": nll, "nll": nll}

    def _hybrid_metrics(self, x: Tensor, y: Optional[Tensor]) -> dict[str, Tensor]:
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
                f"{stage}/{k}", v.mean(), on_step=stage == "train", on_epoch=True,
                prog_bar=k == "loss", sync_dist=stage != "train", batch_size=batch_size,
            )

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        x = self._batch_input(batch)
        values = self._step_metrics(batch, x, "train")
        values.update(self._regularization(values["loss"]))
        loss = values["loss"].mean()
        if not torch.isfinite(loss):
            return self._handle_nonfinite(loss)
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

    def _handle_nonfinite(self, loss: Tensor) -> None:
        event = {"step": int(self.global_step), "loss": float(loss), "policy": self.on_nonfinite}
        self.nonfinite_events.append(event)
        self.log("train/nonfinite_losses", float(len(self.nonfinite_events)), on_step=True)
        if self.on_nonfinite == "stop":
            self.stop_reason = (
                f"the training loss became {float(loss)} at step {event['step']}; the run stopped before "
                f"applying that update, so the weights and the last checkpoint are the last good ones"
            )
            self.trainer.should_stop = True
        return None  # Lightning skips backward and the optimizer step

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A finite loss can still give NaN/inf gradients (an overflow in a backward pass, an adjoint solve that
        blew up): drop the whole update, record the step and the first parameter affected, and apply the
        ``on_nonfinite`` policy (``stop``: end the run with the weights untouched; ``skip``: go on).  Not under
        ``16-mixed``, whose gradient scaler skips such steps by design."""
        if "16-mixed" in str(self.trainer.precision) and "bf16" not in str(self.trainer.precision):
            return
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        # one fused max|g| over all gradients (NaN and inf propagate, finite values cannot overflow), one sync
        if not named or bool(torch.isfinite(get_total_norm([g for _, g in named], norm_type=float("inf")))):
            return
        bad = [n for n, g in named if not bool(torch.isfinite(g).all())]
        for group in optimizer.param_groups:
            for q in group["params"]:
                q.grad = None  # the optimizer skips parameters without gradient: no update at all
        step = int(self.global_step)
        self.nonfinite_events.append({"step": step, "gradient": bad[0], "count": len(bad), "policy": self.on_nonfinite})
        self.log("train/nonfinite_gradients", float(sum("gradient" in e for e in self.nonfinite_events)), on_step=True)
        if self.on_nonfinite == "stop":
            self.stop_reason = (
                f"the gradients of {len(bad)} parameter tensors became NaN/inf at step {step} (first: {bad[0]}) "
                f"with a finite loss; the update was dropped and the run stopped, so the weights and the last "
                f"checkpoint are the last good ones (on_nonfinite=skip drops such steps and goes on)"
            )
            self.trainer.should_stop = True

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._batch_input(batch)
        self._log("val", self._step_metrics(batch, x, "val"), x.shape[0])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x = self._batch_input(batch)
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

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # during training at most lipschitz_step_iters warm-started iterations per step (the subspace carries
        # over, so the estimate keeps converging across steps); before validation/test: to tolerance
        stats = update_lipschitz(self.model, max_iters=self.lipschitz_step_iters)
        if stats:
            self.log("train/max_sigma", stats["max_sigma"], on_step=True, on_epoch=False)
        for key, value in nfe_summary(self.model).items():
            self.log(f"train/{key}", float(value), on_step=True, on_epoch=False)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:  # (reading the stats syncs the device)
            for key, value in solver_summary(self.model).items():
                self.log(f"train/solver/{key}", value, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self) -> None:
        update_lipschitz(self.model)

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

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(linear_warmup, warmup_steps=self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
