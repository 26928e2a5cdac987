"""Picard (Banach) iteration with damping:  ``x_{k+1} = (1 - beta) x_k + beta T(x_k)``.

For a contraction T with constant L it converges linearly at rate L (``beta = 1``); damping
``0 < beta < 1`` helps maps that oscillate.  Used for the inverse of residual blocks,
``x = y - g(x)`` (Behrmann et al., 2019, Alg. 1), and as the fallback of the accelerated methods.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Picard:
    name = "picard"

    def __init__(self, batch: int, dim: int, dtype: torch.dtype, device: torch.device, damping: float = 1.0):
        self.beta = float(damping)

    def next(self, idx: Tensor, k: int, x: Tensor, f: Tensor) -> Tensor:
        return f if self.beta == 1.0 else x + self.beta * (f - x)
