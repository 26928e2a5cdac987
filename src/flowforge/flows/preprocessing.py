"""Preprocessing layers between data space and the flow: logit transform and dequantisation.

Logit transform (RealNVP):  ``s = alpha + (1 - 2 alpha) x``,  ``y = log s - log(1 - s)``, so
``log |dy/dx| = sum log(1 - 2 alpha) - log s - log(1 - s)``.  It maps data in [0, 1] to R.

Uniform dequantisation: discrete x in {0, ..., K-1}^D becomes ``y = (x + u) / K`` with
``u ~ U[0, 1)^D``; then ``log P(x) >= E_u[log p(y)] - D log K`` (Theis et al., 2016), which is the
bound :meth:`flowforge.flows.model.Flow.bits_per_dim` reports.

Gaussian noise augmentation (TarFlow, Zhai et al. 2025): ``y = (x + 1/2) / K + s eps`` with ``eps ~ N(0, I)``.  The
model is then a density of the noisy data, and ``-(log p(y) - D log K) / (D log 2)`` is its bits per dimension in
pixel units (the change of measure from [0, 1] to [0, K)), not a bound on the discrete model's.

The symmetric map ``y = 2 x - 1`` (log-det ``D log 2``) takes [0, 1] to [-1, 1], TarFlow's data range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.base import Transform, sum_except_batch


class Logit(Transform):
    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0.0 < alpha < 0.5:
            raise ConfigError(f"logit alpha must lie in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        ladj = math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)
        return y, sum_except_batch(ladj)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


class UniformDequantization(nn.Module):
    """``dequantize(x) -> (y, log_weight)`` with ``y = (x + u) / K`` and ``log_weight = -D log K``.

    ``log_weight`` is what must be added to ``log p(y)`` to get the bound on ``log P(x)``.
    """

    name = "uniform"

    def __init__(self, num_levels: int):
        super().__init__()
        self.num_levels = int(num_levels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x + torch.rand_like(x)) / self.num_levels, self.log_weight(x)

    def log_weight(self, x: Tensor) -> Tensor:
        """``-D log K`` per sample: the change of measure from [0, 1] to the K levels' scale."""
        d = x[0].numel()
        return torch.full((x.shape[0],), -d * math.log(self.num_levels), device=x.device, dtype=x.dtype)

    def quantize(self, y: Tensor) -> Tensor:
        """Back to integer levels: ``floor(y K)`` clamped to the valid range."""
        return torch.floor(y * self.num_levels).clamp(0, self.num_levels - 1)


class GaussianDequantization(UniformDequantization):
    """``dequantize(x) -> (y, log_weight)`` with ``y = (x + 1/2) / K + s eps``, ``eps ~ N(0, I)``, and
    ``log_weight = -D log K`` (module docstring: the bits/dim of the noisy density, not a bound)."""

    name = "gaussian"

    def __init__(self, num_levels: int, std: float):
        super().__init__(num_levels)
        if not std > 0:
            raise ConfigError(f"the Gaussian noise std must be positive, got {std}")
        self.std = float(std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x + 0.5) / self.num_levels + self.std * torch.randn_like(x), self.log_weight(x)


class Symmetric(Transform):
    """``y = 2 x - 1``: [0, 1] to [-1, 1], ``log |det dy/dx| = D log 2``."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return 2 * x - 1, x.new_full((x.shape[0],), x[0].numel() * math.log(2))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return (y + 1) / 2
