"""Base distributions p_Z of a flow.

``log p(z) = -1/2 sum_i ((z_i - mu_i) / sigma_i)^2 - sum_i log sigma_i - D/2 log(2 pi)``.
Sampling at temperature T draws ``z = mu + T sigma eps`` (T < 1 gives the usual "cooler" samples).
The conditional base of a conditional flow has ``(mu, log sigma) = NN(h)`` of the context features ``h``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowforge.nn import MLP


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


class ConditionalDiagonalGaussian(nn.Module):
    """``p_Z(z | h) = N(z; mu(h), diag sigma(h)^2)`` with ``(mu, log sigma) = MLP(h)`` of the context features ``h``
    (a conditional flow's learned conditional prior; the MLP's last layer starts at zero, so the base starts as
    N(0, I))."""

    conditional = True

    def __init__(self, shape: Sequence[int], context_features: int, hidden: Sequence[int] = (64,)):
        super().__init__()
        self.shape = tuple(shape)
        self.net = MLP(context_features, list(hidden), 2 * self.dim)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_scale = self.net(h).chunk(2, dim=1)
        return loc.view(-1, *self.shape), log_scale.view(-1, *self.shape)

    def log_prob(self, z: Tensor, context: Tensor) -> Tensor:
        loc, log_scale = self.params(context)
        eps = (z - loc) * torch.exp(-log_scale)
        return -0.5 * (eps.square() + 2 * log_scale).reshape(z.shape[0], -1).sum(1) - 0.5 * self.dim * math.log(
            2 * math.pi
        )

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        loc, log_scale = self.params(context)
        eps = torch.randn((n, *self.shape), device=loc.device, dtype=loc.dtype)
        return loc + temperature * torch.exp(log_scale) * eps


BASES = ("normal", "diagonal", "conditional")


def make_base(name: str, shape: Sequence[int], context_features: int = 0) -> nn.Module:
    """``normal`` (standard normal), ``diagonal`` (learned diagonal Gaussian) or ``conditional`` (a Gaussian whose
    mean and scale depend on the context: :class:`ConditionalDiagonalGaussian`, conditional models only)."""
    from flowforge.errors import ConfigError

    if name == "normal":
        return StandardNormal(shape)
    if name == "diagonal":
        return DiagonalGaussian(shape)
    if name == "conditional":
        if not context_features:
            raise ConfigError(
                "model.base=conditional makes the base depend on the context, but the model has none (model.context "
                "is null); use base=normal or base=diagonal, or a conditional dataset (dataset.conditional=true)"
            )
        return ConditionalDiagonalGaussian(shape, context_features)
    raise ConfigError(f"unknown base distribution '{name}'; choose one of {BASES}")
