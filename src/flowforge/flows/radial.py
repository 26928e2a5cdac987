"""Radial flows (Rezende & Mohamed, 2015).

``z = x + beta h(r) (x - x0)`` with ``r = |x - x0|``, ``h(r) = 1 / (alpha + r)``, ``alpha = softplus(a)``
and ``beta = -alpha + softplus(b')`` (so ``beta > -alpha`` and the map is invertible):

    log |det dz/dx| = (D - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r).

The inverse solves ``|z - x0| = r (1 + beta / (alpha + r))`` for r, a quadratic with one positive root.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.flows.base import Transform, oriented
from flowforge.flows.context import unconditional_only
from flowforge.flows.registry import register_family


class Radial(Transform):
    def __init__(self, dim: int):
        super().__init__()
        self.x0 = nn.Parameter(torch.randn(dim) * 0.1)
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def _ab(self) -> tuple[Tensor, Tensor]:
        alpha = F.softplus(self.a)
        return alpha, -alpha + F.softplus(self.b)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        alpha, beta = self._ab()
        diff = x - self.x0
        r = diff.norm(dim=1)
        h = 1 / (alpha + r)
        z = x + (beta * h)[:, None] * diff
        d = x.shape[1]
        log_det = (d - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * h.pow(2) * r)
        return z, log_det

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        alpha, beta = self._ab()
        diff = z - self.x0
        rz = diff.norm(dim=1)
        # r^2 + (alpha + beta - rz) r - rz alpha = 0
        p = alpha + beta - rz
        r = 0.5 * (-p + torch.sqrt(p.pow(2) + 4 * rz * alpha))
        return self.x0 + (r / rz.clamp_min(1e-30))[:, None] * diff


def radial_family(
    shape: Sequence[int],
    num_layers: int = 16,
    base: str = "normal",
    direction: str = "density",
    context: Any = None,
    context_net: Any = None,
    **kwargs,
):
    """Model config ``radial``: a stack of radial layers on vector data; ``direction=sampling`` puts the
    closed form on the sampling side (see :func:`flowforge.flows.base.oriented`)."""
    unconditional_only("radial", context, context_net)
    from flowforge.flows.model import build_flow, vector_dim

    dim = vector_dim(shape, "radial")
    return build_flow(
        shape, oriented([Radial(dim) for _ in range(num_layers)], direction, "radial"), base=base, **kwargs
    )


register_family(
    radial_family,
    "radial",
    title="Radial flow (Rezende & Mohamed, 2015)",
    data=("vector",),
    test=("model.num_layers=3",),
    smoke={"num_layers": 3},
)
