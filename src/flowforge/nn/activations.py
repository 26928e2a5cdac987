"""1-Lipschitz activations for invertible residual blocks, each with its Jacobian-vector product.

Every activation ``phi`` here has Lip(phi) <= 1, so a network of spectrally normalised layers with
norms <= c and these activations has Lip(g) <= c.  ``linearize(x)`` returns ``(phi(x), jvp)`` where
``jvp(v) = J_phi(x) v`` reuses the derivative computed once at ``x`` ("activation derivatives frozen at
the input"), so the k-th power-series term J_g^k v of a residual block costs one cheap pass of matrix
products rather than a fresh autograd call.  The derivative tensors are built with autograd when grad
mode is on, so the JVP is differentiable in x and in the parameters (needed by the Neumann surrogate).

- LipSwish (Chen et al., 2019): ``phi(z) = z sigmoid(beta z) / 1.1``, ``beta = softplus(b)``, b learnable
  (init 0.5);  ``phi'(z) = [s + beta z s (1 - s)] / 1.1`` with ``s = sigmoid(beta z)``.
- CLipSwish (Perugachi-Diaz et al., 2021): ``[LipSwish(z), LipSwish(-z)] / 1.004`` along channels
  (doubles the channel count); the 1.004 makes the concatenation 1-Lipschitz.
- MaxMin (Anil et al., 2019): channel pairs ``(a, b) -> (max(a, b), min(a, b))``; gradient-norm preserving.
- ELU, softplus, ``sin(2 pi z) / (2 pi)`` and the identity.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import ConfigError

Jvp = Callable[[Tensor], Tensor]


class ElementwiseActivation(nn.Module):
    """An activation applied per element; subclasses give ``value_and_derivative(x)``."""

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.value_and_derivative(x)[0]

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        y, d = self.value_and_derivative(x)
        return y, lambda v: v * d


class LipSwish(ElementwiseActivation):
    def __init__(self, beta_init: float = 0.5):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(F.softplus(self.beta) * x) / 1.1

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        beta = F.softplus(self.beta)
        s = torch.sigmoid(beta * x)
        return x * s / 1.1, (s + beta * x * s * (1 - s)) / 1.1


class CLipSwish(nn.Module):
    """Concatenated LipSwish along dim 1: ``C -> 2C`` channels."""

    scale = 1.004

    def __init__(self, beta_init: float = 0.5):
        super().__init__()
        self.swish = LipSwish(beta_init)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.swish(x), self.swish(-x)], dim=1) / self.scale

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        y1, d1 = self.swish.value_and_derivative(x)
        y2, d2 = self.swish.value_and_derivative(-x)
        y = torch.cat([y1, y2], dim=1) / self.scale
        return y, lambda v: torch.cat([v * d1, -v * d2], dim=1) / self.scale


class MaxMin(nn.Module):
    """Sorts channel pairs ``(x[:, :C/2], x[:, C/2:])`` into ``(max, min)``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.linearize(x)[0]

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        if x.shape[1] % 2:
            raise ConfigError(f"MaxMin needs an even number of channels, got {x.shape[1]}; use an even width")
        a, b = x.chunk(2, dim=1)
        keep = (a >= b).to(x.dtype)

        def jvp(v: Tensor) -> Tensor:
            va, vb = v.chunk(2, dim=1)
            return torch.cat([keep * va + (1 - keep) * vb, keep * vb + (1 - keep) * va], dim=1)

        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1), jvp


class ELU(ElementwiseActivation):
    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.expm1(x.clamp_max(0))
        return torch.where(x > 0, x, e), torch.where(x > 0, torch.ones_like(x), e + 1)


class Softplus(ElementwiseActivation):
    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.softplus(x), torch.sigmoid(x)


class Sin(ElementwiseActivation):
    """``sin(2 pi x) / (2 pi)``: 1-Lipschitz with a non-vanishing second derivative."""

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = 2 * math.pi * x
        return torch.sin(t) / (2 * math.pi), torch.cos(t)


class Identity(ElementwiseActivation):
    def forward(self, x: Tensor) -> Tensor:
        return x

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        return x, lambda v: v


LIPSCHITZ_ACTIVATIONS = {
    "lipswish": LipSwish,
    "swish": LipSwish,
    "clipswish": CLipSwish,
    "maxmin": MaxMin,
    "elu": ELU,
    "softplus": Softplus,
    "sin": Sin,
    "identity": Identity,
}


def lipschitz_activation(name: str) -> nn.Module:
    """Build a 1-Lipschitz activation by name (see ``LIPSCHITZ_ACTIVATIONS``)."""
    try:
        return LIPSCHITZ_ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown Lipschitz activation '{name}'; choose one of {sorted(LIPSCHITZ_ACTIVATIONS)}"
        ) from None


def channel_multiplier(name: str) -> int:
    """How many output channels an activation makes per input channel (2 for CLipSwish)."""
    lipschitz_activation(name)  # validates the name
    return 2 if name == "clipswish" else 1
