"""Exact against estimated bits/dim of a flow whose log-det is estimated (residual flows, i-ResNets).

A truncated power series (i-ResNet) is a biased estimate of ``log |det(I + J_g)|``, and training can exploit the
bias: the objective improves while the true likelihood does not (Chen et al. 2019, Residual Flows, Fig. 2). This
callback measures both on the validation and test sets, on the same dequantised inputs ``y``:

    exact:      log p(y) = log p_Z(f(y)) + log |det df/dy|, with the Jacobian built row by row by autograd,
    estimated:  the model's own ``log_prob(y)`` with its log-det estimator in training mode (what the loss saw),

and logs ``<stage>/bpd_exact``, ``<stage>/bpd_estimated`` and ``<stage>/bpd_gap = exact - estimated`` (bits/dim;
nats per dimension on continuous data). A positive gap is an estimate below the true bits/dim. Both use the
weights Lightning evaluates with (EMA weights when the ema callback is on). For vector data of up to
:data:`MAX_DIM` dimensions (the Jacobian costs one backward pass per dimension).
"""

from __future__ import annotations

import copy
import math

import pytorch_lightning as pl
import torch
from torch import Tensor

from flowforge.errors import ConfigError
from flowforge.flows.model import Flow

#: largest data dimension whose Jacobian is built (one backward pass per output dimension)
MAX_DIM = 256


def exact_log_prob(model: Flow, y: Tensor) -> Tensor:
    """``log p_Z(f(y)) + log |det df/dy|`` per sample in float64 from the full Jacobian of the flow's forward map;
    samples are independent, so row ``j`` of every sample's Jacobian is the gradient of ``sum_b f(y)_{b, j}``."""
    y = y.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(y)[0].reshape(len(y), -1)
        rows = [
            torch.autograd.grad(z[:, j].sum(), y, retain_graph=j + 1 < z.shape[1])[0].reshape(len(y), -1)
            for j in range(z.shape[1])
        ]
    jac = torch.stack(rows, dim=1).double()
    return model.base.log_prob(z.detach()).double() + torch.linalg.slogdet(jac)[1]


def estimated_log_prob(model: Flow, y: Tensor, draws: int = 1) -> Tensor:
    """The model's ``log_prob(y)`` with its estimator in training mode, averaged over ``draws`` independent draws of
    its probes and series lengths (no gradient; the mode is restored): the mean approaches the estimator's
    expectation, so what remains against the exact value is its bias."""
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            return torch.stack([model.log_prob(y).double() for _ in range(draws)]).mean(0)
    finally:
        model.train(was_training)


class EstimatorGap(pl.Callback):
    """Log exact and estimated bits/dim side by side at every validation and at test (see the module docstring).

    Each evaluation batch is measured as it passes (with the weights that evaluation uses), with dequantisation
    noise and probes drawn from a generator seeded by the batch index, so successive validations see the same
    noise; the global random streams are left untouched.  ``max_batches`` caps the validation batches measured
    per validation (``None``: all); the test set is always measured whole.  ``draws`` estimates are averaged per
    example, so that the noise of an unbiased estimator does not pass for a gap.
    """

    def __init__(self, max_batches: int | None = None, draws: int = 8):
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ConfigError(
                f"callbacks.estimator_gap.max_batches must be a positive integer or null, got {max_batches!r}"
            )
        if not isinstance(draws, int) or draws < 1:
            raise ConfigError(f"callbacks.estimator_gap.draws must be a positive integer, got {draws!r}")
        self.max_batches, self.draws = max_batches, draws
        self._exact: list[Tensor] = []
        self._estimated: list[Tensor] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = pl_module.model
        if model.dim > MAX_DIM:
            raise ConfigError(
                f"callbacks.estimator_gap builds the full Jacobian and takes data of at most {MAX_DIM} "
                f"dimensions, but the data has shape {list(model.data_shape)} ({model.dim} dimensions); drop the "
                f"callback (~callbacks.estimator_gap) for this dataset"
            )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and (self.max_batches is None or batch_idx < self.max_batches):
            self._measure(pl_module, batch, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._measure(pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(pl_module, "test")

    def _measure(self, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.inference_mode(False), torch.random.fork_rng(devices=devices):
            # a copy made outside inference mode: Lightning evaluates under torch.inference_mode, and values the
            # layers cached there (normalised weights) cannot enter the autograd graph of the Jacobian
            model: Flow = copy.deepcopy(pl_module.model)
            torch.manual_seed(batch_idx)
            x = x.clone()
            if model.dequantizer is not None:
                with torch.no_grad():
                    y, log_weight = model.dequantizer(x)
            else:
                y, log_weight = x, torch.zeros(len(x), device=x.device)
            self._exact.append(exact_log_prob(model, y) + log_weight.double())
            self._estimated.append(estimated_log_prob(model, y, self.draws) + log_weight.double())

    def _log(self, pl_module: pl.LightningModule, stage: str) -> None:
        """Log the means over all measured examples of every process: per-process sums and counts, summed over the
        processes in one collective, which every rank runs at each validation and test end (also with nothing
        measured, e.g. in the sanity check)."""
        device = pl_module.device if pl_module.device.type != "mps" else torch.device("cpu")
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        if self._exact:
            exact, estimated = torch.cat(self._exact), torch.cat(self._estimated)
            n = torch.tensor(float(len(exact)), dtype=torch.float64, device=exact.device)
            sums = torch.stack([exact.sum(), estimated.sum(), n]).to(device)
        self._exact, self._estimated = [], []
        trainer = pl_module._trainer
        if trainer is not None:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[2]) == 0:
            return
        scale = -1.0 / (pl_module.model.dim * math.log(2))
        bpd_exact, bpd_estimated = sums[0] / sums[2] * scale, sums[1] / sums[2] * scale
        values = {
            f"{stage}/bpd_exact": bpd_exact,
            f"{stage}/bpd_estimated": bpd_estimated,
            f"{stage}/bpd_gap": bpd_exact - bpd_estimated,
        }
        for key, value in values.items():
            # the same value on every rank: sync_dist (a mean of equal values) only marks it as reduced for Lightning
            pl_module.log(key, value.float(), on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
