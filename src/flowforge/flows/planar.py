"""Planar flows (Rezende & Mohamed, 2015).

``z = x + u_hat tanh(w^T x + b)``,  ``log |det dz/dx| = log |1 + u_hat^T w tanh'(w^T x + b)|``,
with ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2`` and ``m(a) = -1 + softplus(a)`` so that
``w^T u_hat > -1`` and the map is invertible.  The inverse reduces to the scalar equation
``a + (w^T u_hat) tanh(a + b) = w^T z`` for ``a = w^T x`` (strictly increasing in a), solved by
bisection on the bracket ``|a - w^T z| <= |w^T u_hat|`` and polished with Newton steps; then
``x = z - u_hat tanh(a + b)``.

A conditional layer is amortised (van den Berg et al., 2018): its parameters are functions of the context
features ``h``, a linear map of ``h`` added to the free parameters,

    (u(h), w(h), b(h)) = (u, w, b) + A h,

and ``u_hat(h)`` is built from ``u(h), w(h)`` per example, so every ``z = f(x; h)`` is invertible in x.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import DataError
from flowforge.flows.base import Transform, oriented
from flowforge.flows.context import context_features, make_context
from flowforge.flows.registry import register_family

if TYPE_CHECKING:
    from flowforge.flows.model import Flow


def _u_hat(u: Tensor, w: Tensor) -> Tensor:
    """``u + (m(w^T u) - w^T u) w / |w|^2`` over the last dimension (one layer, or one per example)."""
    wu = (w * u).sum(-1, keepdim=True)
    return u + (F.softplus(wu) - 1 - wu) * w / w.pow(2).sum(-1, keepdim=True)


class Planar(Transform):
    """One planar layer (module docstring); ``context_features > 0`` makes it amortised over the context."""

    pathwise_inverse = False  # the inverse is a bisection without gradient

    def __init__(self, dim: int, context_features: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) * 0.1)
        self.u = nn.Parameter(torch.randn(dim) * 0.1)
        self.b = nn.Parameter(torch.zeros(()))
        self.context_map: nn.Linear | None = None
        if context_features:
            # A h -> (du, dw, db); zero at init, so a conditional layer starts as the unconditional one
            self.context_map = nn.Linear(context_features, 2 * dim + 1, bias=False)
            nn.init.zeros_(self.context_map.weight)

    def u_hat(self) -> Tensor:
        wu = self.w @ self.u
        return self.u + (F.softplus(wu) - 1 - wu) * self.w / self.w.pow(2).sum()

    def amortised(self, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(u_hat(h), w(h), b(h))`` per example, shapes ``(B, D), (B, D), (B,)``."""
        if context is None:
            raise DataError("a conditional planar layer needs the context features h, shape (batch, features)")
        d = self.w.shape[0]
        du, dw, db = self.context_map(context).split([d, d, 1], dim=1)
        w = self.w + dw
        return _u_hat(self.u + du, w), w, self.b + db[:, 0]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.context_map is not None:
            u, w, b = self.amortised(context)
            h = torch.tanh((x * w).sum(1) + b)
            log_det = torch.log(torch.abs(1 + (1 - h.pow(2)) * (u * w).sum(1)))
            return x + h[:, None] * u, log_det
        u = self.u_hat()
        h = torch.tanh(x @ self.w + self.b)
        z = x + h[:, None] * u
        log_det = torch.log(torch.abs(1 + (1 - h.pow(2)) * (u @ self.w)))
        return z, log_det

    @torch.no_grad()
    def inverse(self, z: Tensor, context: Tensor | None = None, iters: int = 100) -> Tensor:
        if self.context_map is not None:
            u, w, b = self.amortised(context)
            wu, target = (u * w).sum(1), (z * w).sum(1)
        else:
            u, w, b = self.u_hat(), self.w, self.b
            wu, target = u @ w, z @ w
        lo, hi = target - wu.abs() - 1e-6, target + wu.abs() + 1e-6

        def g(a: Tensor) -> Tensor:
            return a + wu * torch.tanh(a + b) - target

        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            pos = g(mid) > 0
            hi, lo = torch.where(pos, mid, hi), torch.where(pos, lo, mid)
        a = 0.5 * (lo + hi)
        for _ in range(3):
            a = a - g(a) / (1 + wu * (1 - torch.tanh(a + b).pow(2)))
        return z - torch.tanh(a + b)[:, None] * u


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
    closed form on the sampling side (see :func:`flowforge.flows.base.oriented`).  A conditional model
    (``context``) amortises every layer's parameters over the context features (module docstring)."""
    from flowforge.flows.model import build_flow, vector_dim

    emb = make_context(context, context_net)
    dim = vector_dim(shape, "planar")
    layers = [Planar(dim, context_features(emb)) for _ in range(num_layers)]
    return build_flow(shape, oriented(layers, direction, "planar"), base=base, context=emb, **kwargs)


register_family(
    planar_family,
    "planar",
    title="Planar flow (Rezende & Mohamed, 2015)",
    data=("vector",),
    pathwise="model.direction=sampling",
    conditional=True,
    test=("model.num_layers=3",),
    smoke={"num_layers": 3},
)
