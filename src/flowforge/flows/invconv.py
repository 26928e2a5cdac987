"""Invertible linear map over channels in LU form (Glow's invertible 1x1 convolution).

``W = P L (U + diag(sign(s) exp(log|s|)))`` with P a fixed permutation, L unit lower-triangular and U
strictly upper-triangular; ``z = W x`` over the channel axis at every pixel, so
``log |det| = (H W) sum_i log|s_i|`` in O(C).  For vectors it is a full invertible linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.base import Transform

INITS = ("orthogonal", "permutation", "identity")


def initial_weight(c: int, init: str) -> Tensor:
    """The starting matrix: a random rotation (Glow), a random permutation, or the identity."""
    if init == "orthogonal":
        return torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
    if init == "permutation":
        return torch.eye(c, dtype=torch.float64)[torch.randperm(c)]
    if init == "identity":
        return torch.eye(c, dtype=torch.float64)
    raise ConfigError(f"unknown LU initialisation '{init}'; choose one of {', '.join(INITS)}")


class InvertibleLinearLU(Transform):
    """``init`` picks the starting ``W``: ``orthogonal`` (a random rotation, as Glow initialises its 1x1
    convolutions), ``permutation`` (a random permutation of the features) or ``identity``."""

    def __init__(self, shape: Sequence[int], init: str = "orthogonal"):
        super().__init__()
        shape = tuple(shape)
        c = shape[0]
        self.spatial = 1
        for s in shape[1:]:
            self.spatial *= s
        p, lower, upper = torch.linalg.lu(initial_weight(c, init))
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(diag).float())
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())

    def weight(self) -> Tensor:
        """``W = P L U`` in the parameters' precision (autocast off: the inverse needs it, and bf16 would round
        ``W`` away from the log-det ``sum(log_s)``)."""
        with torch.autocast(device_type=self.lower.device.type, enabled=False):
            eye = torch.eye(self.lower.shape[0], device=self.lower.device, dtype=self.lower.dtype)
            lower = torch.tril(self.lower, -1) + eye
            upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
            return self.perm @ (lower @ upper)

    def _mix(self, x: Tensor, w: Tensor) -> Tensor:
        if x.dim() == 2:
            return F.linear(x, w)
        return F.conv2d(x, w[:, :, None, None])

    def _log_det(self) -> Tensor:
        log_det = self.log_s.sum()
        return log_det if self.spatial == 1 else log_det * self.spatial

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._mix(x, self.weight()), self._log_det().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self._mix(z, torch.linalg.inv(self.weight()))

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(z), (-self._log_det()).expand(z.shape[0])
