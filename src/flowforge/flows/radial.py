"""Radial flows (Rezende & Mohamed, 2015).

``z = x + beta h(r) (x - x0)`` with ``r = |x - x0|``, ``h(r) = 1 / (alpha + r)``, ``alpha = softplus(a)``
and ``beta = -alpha + softplus(b')`` (so ``beta > -alpha`` and the map is invertible):

    log |det dz/dx| = (D - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r).

The inverse solves ``|z - x0| = r (1 + beta / (alpha + r))`` for r, a quadratic with one positive root.

A conditional layer is amortised (van den Berg et al., 2018): its parameters are functions of the context
features ``h``, a linear map of ``h`` added to the free parameters,

    (x0(h), a(h), b'(h)) = (x0, a, b') + A h,

with ``alpha(h) = softplus(a(h))`` and ``beta(h) = -alpha(h) + softplus(b'(h)) > -alpha(h)`` per example, so every
``z = f(x; h)`` is invertible in x.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import DataError
from flowforge.flows.base import Transform, oriented
from flowforge.flows.context import context_features, make_context
from flowforge.flows.registry import register_family


class Radial(Transform):
    """One radial layer (module docstring); ``context_features > 0`` makes it amortised over the context."""

    def __init__(self, dim: int, context_features: int = 0):
        super().__init__()
        self.x0 = nn.Parameter(torch.randn(dim) * 0.1)
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))
        self.context_map: nn.Linear | None = None
        if context_features:
            # A h -> (dx0, da, db'); zero at init, so a conditional layer starts as the unconditional one
            self.context_map = nn.Linear(context_features, dim + 2, bias=False)
            nn.init.zeros_(self.context_map.weight)

    def _ab(self) -> tuple[Tensor, Tensor]:
        alpha = F.softplus(self.a)
        return alpha, -alpha + F.softplus(self.b)

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(x0, alpha, beta)``: the layer's own, or per example ``(B, D), (B,), (B,)`` for a conditional layer."""
        if self.context_map is None:
            return (self.x0, *self._ab())
        if context is None:
            raise DataError("a conditional radial layer needs the context features h, shape (batch, features)")
        dx0, da, db = self.context_map(context).split([self.x0.shape[0], 1, 1], dim=1)
        alpha = F.softplus(self.a + da[:, 0])
        return self.x0 + dx0, alpha, -alpha + F.softplus(self.b + db[:, 0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x0, alpha, beta = self._params(context)
        diff = x - x0
        r = diff.norm(dim=1)
        h = 1 / (alpha + r)
        z = x + (beta * h)[:, None] * diff
        d = x.shape[1]
        log_det = (d - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * h.pow(2) * r)
        return z, log_det

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        x0, alpha, beta = self._params(context)
        diff = z - x0
        rz = diff.norm(dim=1)
        # r^2 + (alpha + beta - rz) r - rz alpha = 0
        p = alpha + beta - rz
        r = 0.5 * (-p + torch.sqrt(p.pow(2) + 4 * rz * alpha))
        return x0 + (r / rz.clamp_min(1e-30))[:, None] * diff


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
    closed form on the sampling side (see :func:`flowforge.flows.base.oriented`).  A conditional model
    (``context``) amortises every layer's parameters over the context features (module docstring)."""
    from flowforge.flows.model import build_flow, vector_dim

    emb = make_context(context, context_net)
    dim = vector_dim(shape, "radial")
    layers = [Radial(dim, context_features(emb)) for _ in range(num_layers)]
    return build_flow(shape, oriented(layers, direction, "radial"), base=base, context=emb, **kwargs)


register_family(
    radial_family,
    "radial",
    title="Radial flow (Rezende & Mohamed, 2015)",
    data=("vector",),
    conditional=True,
    test=("model.num_layers=3",),
    smoke={"num_layers": 3},
)
