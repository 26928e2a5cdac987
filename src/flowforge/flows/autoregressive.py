"""Masked autoregressive transforms (Papamakarios et al., MAF, 2017; Kingma et al., IAF, 2016).

``z_i = tau(x_i; theta_i(x_{<i}))`` with theta from a MADE, so the Jacobian is triangular and
``log |det dz/dx| = sum_i log |tau'(x_i)|``.  The data-to-base direction takes one MADE pass; the
inverse is exact after D passes (pass k fixes the k-th variable in the order).  IAF is
``Inverse(MaskedAutoregressive)``: one pass to sample, D passes to evaluate a density.

A conditional layer (``context_features`` F > 0) reads the context features ``h`` in its MADE,
``z_i = tau(x_i; theta_i(x_{<i}, h))`` (Papamakarios et al., 2017); the Jacobian in x stays triangular and every
inverse pass sees the same ``h``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowforge.flows.base import Transform
from flowforge.nn import MADE


class MaskedAutoregressive(Transform):
    def __init__(
        self,
        dim: int,
        elementwise,
        hidden: Sequence[int],
        order: Sequence[int] | None = None,
        act: str = "relu",
        context_features: int = 0,
    ):
        super().__init__()
        self.elementwise = elementwise
        self.made = MADE(dim, hidden, elementwise.num_params, order=order, act=act, context_features=context_features)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, ladj = self.elementwise.forward(x, self.made(x, context))
        return z, ladj.sum(1)

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.zeros_like(z)
        for _ in range(z.shape[1]):
            x, ladj = self.elementwise.inverse(z, self.made(x, context))
        return x, ladj.sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(z, context)[0]
