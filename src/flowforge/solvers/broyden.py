"""Broyden's ("good") method for ``g(x) = T(x) - x = 0`` with a limited-memory inverse Jacobian.

The inverse-Jacobian estimate starts at ``B_0 = -I`` (so the first step is a Picard step) and after each
step ``s = x_{k+1} - x_k``, ``y = g_{k+1} - g_k`` is updated to satisfy the secant condition
``B y = s`` with the least change in the ``s^T B`` direction:

    B_{k+1} = B_k + (s - B_k y) (s^T B_k) / (s^T B_k y),       x_{k+1} = x_k - B_k g_k.

``B = -I + U V^T`` is stored as up to ``memory`` rank-one pairs per sample; when they are used up the
estimate restarts from ``-I`` (overwriting old pairs instead breaks the secant structure and diverges),
and a sample whose residual grows more than tenfold in one step restarts too.  A pair whose denominator
``|s^T B y|`` is negligible is skipped.  There is no line search: the driver keeps each sample's best
iterate and :class:`flowforge.solvers.solver.Solver` can finish unconverged samples with Picard
iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Broyden:
    name = "broyden"

    def __init__(self, batch: int, dim: int, dtype: torch.dtype, device: torch.device, memory: int = 30):
        self.m = int(memory)
        self.U = torch.zeros(batch, self.m, dim, dtype=dtype, device=device)
        self.V = torch.zeros_like(self.U)
        self.x_prev = torch.zeros(batch, dim, dtype=dtype, device=device)
        self.g_prev = torch.zeros_like(self.x_prev)

    def _apply(self, idx: Tensor, a: Tensor) -> Tensor:
        """``B a`` for the samples ``idx``."""
        U, V = self.U[idx], self.V[idx]
        return -a + (U * (V * a[:, None]).sum(2, keepdim=True)).sum(1)

    def _apply_t(self, idx: Tensor, a: Tensor) -> Tensor:
        """``B^T a``."""
        U, V = self.U[idx], self.V[idx]
        return -a + (V * (U * a[:, None]).sum(2, keepdim=True)).sum(1)

    def next(self, idx: Tensor, k: int, x: Tensor, f: Tensor) -> Tensor:
        g = f - x
        slot = (k - 1) % self.m
        if k > 0 and slot == 0:  # memory used up: restart from B = -I (filled on the device, no scalar copy)
            self.U.index_fill_(0, idx, 0.0)
            self.V.index_fill_(0, idx, 0.0)
        if k > 0:
            s, y = x - self.x_prev[idx], g - self.g_prev[idx]
            By = self._apply(idx, y)
            den = (s * By).sum(1)
            ok = den.abs() > 1e-12 * s.norm(dim=1) * By.norm(dim=1) + torch.finfo(x.dtype).tiny
            safe = torch.where(ok, den, torch.ones_like(den))
            u = (s - By) / safe[:, None] * ok[:, None]
            v = self._apply_t(idx, s) * ok[:, None]
            self.U[idx, slot], self.V[idx, slot] = u, v
            blown = g.norm(dim=1) > 10 * self.g_prev[idx].norm(dim=1)
            # host sync: inside the solver's loop, which syncs on its active set every iteration anyway
            if blown.any():
                self.U[idx[blown]], self.V[idx[blown]] = 0.0, 0.0
        self.x_prev[idx], self.g_prev[idx] = x, g
        return x - self._apply(idx, g)
