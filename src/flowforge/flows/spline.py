"""Monotone rational-quadratic splines (Durkan et al., Neural Spline Flows, 2019).

On ``[-B, B]`` with K bins of widths w_k, heights h_k and knot derivatives d_k, inside bin k with
``xi = (x - x_k) / w_k`` and ``s_k = h_k / w_k``:

    y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi))
    dy/dx = s_k^2 (d_{k+1} xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2) / (s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi))^2

Outside ``[-B, B]`` the map is the identity (linear tails, boundary derivatives 1).  The inverse
solves the quadratic in xi in closed form.  With all-zero parameters the spline is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class RationalQuadraticSpline:
    def __init__(self, bins: int = 8, bound: float = 5.0, min_width: float = 1e-3, min_derivative: float = 1e-3):
        self.bins, self.bound = bins, bound
        self.min_width, self.min_derivative = min_width, min_derivative
        self.num_params = 3 * bins - 1
        # softplus(0 + shift) + min_derivative == 1: zero parameters give slope 1 everywhere
        self._shift = math.log(math.expm1(1.0 - min_derivative))

    def _knots(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Knot positions (K+1 of them, from -B to B) and bin sizes from unnormalised logits."""
        K, B = self.bins, self.bound
        frac = self.min_width + (1 - self.min_width * K) * torch.softmax(raw, dim=-1)
        inner = torch.cumsum(frac[..., :-1], dim=-1) * (2 * B) - B  # the K-1 interior knots
        # end knots exactly -B and B: zero-pad, then add (-B, 0, ..., 0, B) -- 2 ops instead of 2 full_like + cat.
        # The ends are filled on the device (``edges[0] = -B`` would copy a CPU scalar: a blocking transfer on a GPU)
        edges = torch.zeros(K + 1, dtype=raw.dtype, device=raw.device)
        edges[:1].fill_(-B)
        edges[-1:].fill_(B)
        knots = F.pad(inner, (1, 1)) + edges
        return knots, knots[..., 1:] - knots[..., :-1]

    def _params(self, p: Tensor):
        K = self.bins
        xk, w = self._knots(p[..., :K])
        yk, h = self._knots(p[..., K : 2 * K])
        d = self.min_derivative + F.softplus(p[..., 2 * K :] + self._shift)
        d = F.pad(d, (1, 1), value=1.0)
        return xk, w, yk, h, d

    @staticmethod
    def _gather(idx: Tensor, *tensors: Tensor) -> list[Tensor]:
        # one gather on the stacked tables: one GatherBackward (scatter_add) instead of one per table
        stacked = torch.stack(tensors)
        return list(stacked.gather(-1, idx.expand(len(tensors), *idx.shape)).squeeze(-1).unbind(0))

    def _spline(self, x: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        B = self.bound
        inside = (x > -B) & (x < B)
        xc = x.clamp(-B, B)
        xk, w, yk, h, d = self._params(p)
        knots_in = yk if inverse else xk
        idx = torch.searchsorted(knots_in[..., 1:-1].contiguous(), xc[..., None].contiguous())
        x0, w0, y0, h0, d0, d1 = self._gather(idx, xk[..., :-1], w, yk[..., :-1], h, d[..., :-1], d[..., 1:])
        s = h0 / w0
        if not inverse:
            xi = (xc - x0) / w0
            t = xi * (1 - xi)
            den = s + (d1 + d0 - 2 * s) * t
            out = y0 + h0 * (s * xi.pow(2) + d0 * t) / den
            dydx = s.pow(2) * (d1 * xi.pow(2) + 2 * s * t + d0 * (1 - xi).pow(2)) / den.pow(2)
            ladj = torch.log(dydx)
        else:
            dy = xc - y0
            c2 = d1 + d0 - 2 * s
            a = h0 * (s - d0) + dy * c2
            b = h0 * d0 - dy * c2
            c = -s * dy
            disc = (b.pow(2) - 4 * a * c).clamp_min(0)
            xi = (2 * c) / (-b - torch.sqrt(disc))
            out = x0 + xi * w0
            t = xi * (1 - xi)
            den = s + c2 * t
            dydx = s.pow(2) * (d1 * xi.pow(2) + 2 * s * t + d0 * (1 - xi).pow(2)) / den.pow(2)
            ladj = -torch.log(dydx)
        return torch.where(inside, out, x), torch.where(inside, ladj, torch.zeros_like(ladj))

    def forward(self, x: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(x, p, inverse=False)

    def inverse(self, y: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(y, p, inverse=True)
