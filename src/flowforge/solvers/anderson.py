"""Anderson acceleration (type II, Walker & Ni, 2011) of the fixed-point problem ``x = T(x)``.

With the last ``m_k = min(k + 1, memory)`` iterates ``x_i``, map values ``f_i = T(x_i)`` and residuals
``g_i = f_i - x_i`` of one sample, the mixing weights solve

    min_alpha || sum_i alpha_i g_i ||_2   subject to   sum_i alpha_i = 1,

i.e. ``alpha = H^{-1} 1 / (1^T H^{-1} 1)`` with ``H = G G^T + lam * max(diag(G G^T)) I`` (a relative
Tikhonov term keeps H invertible when residuals become collinear), and

    x_{k+1} = beta sum_i alpha_i f_i + (1 - beta) sum_i alpha_i x_i.

Every sample has its own weights (batched solves of ``m_k x m_k`` systems).  ``memory = 1`` is Picard.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Anderson:
    name = "anderson"

    def __init__(
        self,
        batch: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        memory: int = 5,
        damping: float = 1.0,
        regularization: float = 1e-8,
    ):
        self.m, self.beta, self.lam = int(memory), float(damping), float(regularization)
        self.X = torch.zeros(batch, self.m, dim, dtype=dtype, device=device)
        self.F = torch.zeros_like(self.X)

    def next(self, idx: Tensor, k: int, x: Tensor, f: Tensor) -> Tensor:
        slot = k % self.m
        self.X[idx, slot], self.F[idx, slot] = x, f
        mk = min(k + 1, self.m)
        X, F = self.X[idx, :mk], self.F[idx, :mk]
        if mk == 1:
            return x + self.beta * (f - x)
        G = (F - X).double()  # the small (m x m) systems in float64 whatever the iterate's precision
        H = G @ G.transpose(1, 2)
        scale = H.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(H.dtype).tiny)
        H = H + (self.lam * scale)[:, None, None] * torch.eye(mk, dtype=H.dtype, device=H.device)
        ones = torch.ones(len(idx), mk, 1, dtype=H.dtype, device=H.device)
        a, info = torch.linalg.solve_ex(H, ones)
        alpha = (a / a.sum(1, keepdim=True)).to(x.dtype)
        bad = (info != 0) | ~torch.isfinite(alpha).all(1).squeeze(1)
        # degenerate system: plain (damped) Picard step for that sample (masked fills: no host sync)
        alpha = alpha.masked_fill(bad[:, None, None], 0.0)
        alpha[:, slot].masked_fill_(bad[:, None], 1.0)
        fx = (alpha * F).sum(1)
        if self.beta == 1.0:
            return fx
        return (1 - self.beta) * (alpha * X).sum(1) + self.beta * fx
