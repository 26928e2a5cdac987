"""Planar flows (Rezende & Mohamed, 2015).

``z = x + u_hat tanh(w^T x + b)``,  ``log |det dz/dx| = log |1 + u_hat^T w tanh'(w^T x + b)|``,
with ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2`` and ``m(a) = -1 + softplus(a)`` so that
``w^T u_hat > -1`` and the map is invertible.  The inverse reduces to the scalar equation
``a + (w^T u_hat) tanh(a + b) = w^T z`` for ``a = w^T x`` (strictly increasing in a), solved by
bisection on the bracket ``|a - w^T z| <= |w^T u_hat|`` and polished with Newton steps; then
``x = z - u_hat tanh(a + b)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.flows.base import Transform, oriented
from flowforge.flows.context import unconditional_only
from flowforge.flows.registry import register_family

if TYPE_CHECKING:
    from flowforge.flows.model import Flow


class Planar(Transform):
    pathwise_inverse = False  # the inverse is a bisection without gradient

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) * 0.1)
        self.u = nn.Parameter(torch.randn(dim) * 0.1)
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        wu = self.w @ self.u
        return self.u + (F.softplus(wu) - 1 - wu) * self.w / self.w.pow(2).sum()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u = self.u_hat()
        h = torch.tanh(x @ self.w + self.b)
        z = x + h[:, None] * u
        log_det = torch.log(torch.abs(1 + (1 - h.pow(2)) * (u @ self.w)))
        return z, log_det

    @torch.no_grad()
    def inverse(self, z: Tensor, context: Tensor | None = None, iters: int = 100) -> Tensor:
        u = self.u_hat()
        wu, target = u @ self.w, z @ self.w
        lo, hi = target - wu.abs() - 1e-6, target + wu.abs() + 1e-6

        def g(a: Tensor) -> Tensor:
            return a + wu * torch.tanh(a + self.b) - target

        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            pos = g(mid) > 0
            hi, lo = torch.where(pos, mid, hi), torch.where(pos, lo, mid)
        a = 0.5 * (lo + hi)
        for _ in range(3):
            a = a - g(a) / (1 + wu * (1 - torch.tanh(a + self.b).pow(2)))
        return z - torch.tanh(a + self.b)[:, None] * u


def planar_family(
    shape: Sequence[int],
    num_layers: int = 16,
    base: str = "normal",
    direction: str = "density",
    context: Any = None,
    context_net: Any = None,
    **kwargs,
) -> Flow:
    """Model config ``planar``: a stack of planar layers on vector data; ``direction=sampling`` puts the
    closed form on the sampling side (see :func:`flowforge.flows.base.oriented`)."""
    unconditional_only("planar", context, context_net)
    from flowforge.flows.model import build_flow, vector_dim

    dim = vector_dim(shape, "planar")
    return build_flow(
        shape, oriented([Planar(dim) for _ in range(num_layers)], direction, "planar"), base=base, **kwargs
    )


register_family(
    planar_family,
    "planar",
    title="Planar flow (Rezende & Mohamed, 2015)",
    data=("vector",),
    pathwise="model.direction=sampling",
    test=("model.num_layers=3",),
    smoke={"num_layers": 3},
)
