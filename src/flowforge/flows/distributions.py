"""Base distributions p_Z of a flow.

``log p(z) = -1/2 sum_i ((z_i - mu_i) / sigma_i)^2 - sum_i log sigma_i - D/2 log(2 pi)``.
Sampling at temperature T draws ``z = mu + T sigma eps`` (T < 1 gives the usual "cooler" samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class DiagonalGaussian(nn.Module):
    """Gaussian with per-dimension mean and log standard deviation (learned when ``learn``)."""

    def __init__(self, shape: Sequence[int], learn: bool = True):
        super().__init__()
        self.shape = tuple(shape)
        loc, log_scale = torch.zeros(self.shape), torch.zeros(self.shape)
        if learn:
            self.loc, self.log_scale = nn.Parameter(loc), nn.Parameter(log_scale)
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_scale", log_scale)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def log_prob(self, z: Tensor) -> Tensor:
        eps = (z - self.loc) * torch.exp(-self.log_scale)
        # the constant terms are summed on the parameters, not broadcast over the batch
        const = self.log_scale.sum() + 0.5 * self.dim * math.log(2 * math.pi)
        return -0.5 * eps.square().reshape(z.shape[0], -1).sum(1) - const

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        eps = torch.randn((n, *self.shape), device=self.loc.device, dtype=self.loc.dtype)
        return self.loc + temperature * torch.exp(self.log_scale) * eps


class StandardNormal(DiagonalGaussian):
    """N(0, I): a :class:`DiagonalGaussian` with fixed zero mean and unit scale."""

    def __init__(self, shape: Sequence[int]):
        super().__init__(shape, learn=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * z.square().reshape(z.shape[0], -1).sum(1) - 0.5 * self.dim * math.log(2 * math.pi)


def make_base(name: str, shape: Sequence[int]) -> DiagonalGaussian:
    """``normal`` (standard normal) or ``diagonal`` (learned diagonal Gaussian)."""
    from flowforge.errors import ConfigError

    if name == "normal":
        return StandardNormal(shape)
    if name == "diagonal":
        return DiagonalGaussian(shape)
    raise ConfigError(f"unknown base distribution '{name}'; choose 'normal' or 'diagonal'")
