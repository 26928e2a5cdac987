"""The top singular triplet of a linear operator by Golub-Kahan-Lanczos bidiagonalisation (Golub & Kahan 1965).

Given ``A`` only through its products ``x -> A x`` and ``y -> A^T y`` and a unit start vector ``v_1``, step ``j``
extends orthonormal bases ``U_j = [u_1 .. u_j]`` and ``V_{j+1} = [v_1 .. v_{j+1}]``::

    alpha_j u_j     = A v_j   - (its components along u_1 .. u_{j-1})
    beta_j  v_{j+1} = A^T u_j - (its components along v_1 .. v_j)

(full reorthogonalisation: classical Gram-Schmidt, repeated when it removed most of the vector, Kahan's "twice
is enough"), so that ``A^T U_k = V_{k+1} B_k^T`` with the
upper bidiagonal ``k x (k + 1)`` matrix ``B_k = U_k^T A V_{k+1}`` (diagonal ``alpha``, superdiagonal ``beta``).
The Ritz triplet is the top singular triplet ``(theta, p, q)`` of ``B_k``:

    sigma = theta,    u = U_k p,    v = V_{k+1} q,    u^T A v = sigma,    A^T u = sigma v  (exactly).

Each step costs one product with ``A`` and one with ``A^T``, the cost of one step of power iteration.  One step
gives exactly the power-iteration update ``v <- A^T A v_1 / ||A^T A v_1||``; after ``k`` steps ``v`` is the best
vector of the Krylov space ``span{v_1, (A^T A) v_1, .., (A^T A)^k v_1}``, which holds the ``k``-th power
iterate, so ``sigma`` is never below power iteration's estimate at the same number of products and is still a
lower bound of ``||A||_2``.  It converges at a rate set by the square root of the relative gap between the top
singular values rather than the gap itself, which matters when they cluster (convolutions).

The iteration stops when ``sigma * ||v_k - v_{k-1}|| <= atol + rtol * sigma`` (successive Ritz vectors; the
same test as the power iteration of :mod:`flowforge.nn.lipschitz`), when the Krylov space is invariant (then the
triplet is exact), or after ``max_iters`` steps.  At most ``max_basis`` steps share one basis; the iteration then
restarts from the current ``v`` (explicit restart), so memory stays at ``max_basis + 1`` vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_TINY = 1e-30


@dataclass
class Triplet:
    """Result of :func:`top_singular_triplet`: unit ``u`` and ``v`` with ``u^T A v = sigma``; ``iters`` products
    with each of ``A`` and ``A^T``; ``converged`` when the stopping test (or an invariant subspace) ended it;
    ``right_ritz``: the leading right Ritz vectors of the last basis (orthonormal rows, the first ``v``), at most
    ``num_ritz`` of them, for a block method to continue from."""

    u: Tensor
    v: Tensor
    sigma: Tensor
    iters: int
    converged: bool
    right_ritz: Tensor | None = None


def _orthogonalise(x: Tensor, basis: Tensor) -> Tensor:
    """``x`` minus its components along the orthonormal rows of ``basis``: classical Gram-Schmidt, applied a second
    time when the first pass removed more than half of ``x`` (then rounding may have left it unorthogonal)."""
    if basis.shape[0] == 0:
        return x
    before = torch.linalg.vector_norm(x)
    x = x - basis.T @ (basis @ x)
    again = torch.linalg.vector_norm(x) < 0.5 * before  # (a device synchronisation, as the step's own)
    return x - basis.T @ (basis @ x) if bool(again) else x


def top_singular_triplet(
    op: Callable[[Tensor], Tensor],
    adj: Callable[[Tensor], Tensor],
    v0: Tensor,
    max_iters: int,
    rtol: float,
    atol: float = 0.0,
    max_basis: int = 32,
    num_ritz: int = 1,
) -> Triplet:
    """Top singular triplet of ``A`` (``op(x) = A x``, ``adj(y) = A^T y`` on flat vectors) from the start ``v0``.

    See the module docstring.  ``v0`` is normalised first.  Raises ``FloatingPointError`` when a product is not
    finite.  When ``A v0`` is zero the triplet is ``sigma = 0`` with ``v = v0`` and ``u`` zero.
    """
    if max_iters < 1 or max_basis < 1:
        raise ValueError(f"max_iters and max_basis must be >= 1, got {max_iters} and {max_basis}")
    v_start = v0 / torch.linalg.vector_norm(v0).clamp_min(_TINY)
    total, converged = 0, False
    u = v = sigma = None
    while total < max_iters and not converged:
        steps = min(max_basis, max_iters - total)
        vs = torch.empty((steps + 1, v_start.numel()), dtype=v_start.dtype, device=v_start.device)
        us: Tensor | None = None
        vs[0] = v_start
        alphas: list[float] = []
        betas: list[float] = []
        q_prev = torch.ones(1, dtype=torch.float64)
        k = 0
        for j in range(steps):
            y = _orthogonalise(op(vs[j]), us[:j] if us is not None else vs[:0])
            if us is None:
                us = torch.empty((steps, y.numel()), dtype=y.dtype, device=y.device)
            alpha_t = torch.linalg.vector_norm(y)
            us[j] = y / alpha_t.clamp_min(_TINY)
            z = _orthogonalise(adj(us[j]), vs[: j + 1])
            beta_t = torch.linalg.vector_norm(z)
            vs[j + 1] = z / beta_t.clamp_min(_TINY)
            alpha, beta = torch.stack([alpha_t, beta_t]).tolist()  # one device synchronisation per step
            total += 1
            if not (math.isfinite(alpha) and math.isfinite(beta)):
                raise FloatingPointError(f"a product with the operator is not finite (alpha={alpha}, beta={beta})")
            scale = max([abs(a) for a in alphas] + [abs(b) for b in betas] + [alpha, beta])
            if alpha <= _TINY or alpha <= 1e-12 * scale:  # A v_j lies in span(U_{j-1}): the space is invariant
                converged = True
                break
            alphas.append(alpha)
            k = j + 1
            invariant = beta <= 1e-12 * scale
            betas.append(0.0 if invariant else beta)
            b = torch.zeros((k, k + 1), dtype=torch.float64)
            idx = torch.arange(k)
            b[idx, idx] = torch.tensor(alphas, dtype=torch.float64)
            b[idx, idx + 1] = torch.tensor(betas, dtype=torch.float64)
            left, svals, right_h = torch.linalg.svd(b)
            theta, p, q = float(svals[0]), left[:, 0], right_h[0]
            if float((q[:-1] * q_prev).sum()) < 0:  # singular vectors have no sign: keep the previous one's
                p, q = -p, -q
            moved = float(torch.linalg.vector_norm(q[:-1] - q_prev).square() + q[-1] ** 2) ** 0.5
            q_prev = q
            sigma, best_p, best_q, best_right = theta, p, q, right_h
            if invariant or theta * moved <= atol + rtol * theta:
                converged = True
                break
        if k == 0:  # A v_start = 0: nothing to refine (after a restart: keep the triplet found)
            if u is None:
                zero = torch.zeros((), dtype=v_start.dtype, device=v_start.device)
                return Triplet(torch.zeros_like(us[0]), v_start, zero, total, True)
            break
        dev, dt = v_start.device, v_start.dtype
        u = best_p.to(device=dev, dtype=dt) @ us[:k]
        v = best_q.to(device=dev, dtype=dt) @ vs[: k + 1]
        u = u / torch.linalg.vector_norm(u).clamp_min(_TINY)
        v = v / torch.linalg.vector_norm(v).clamp_min(_TINY)
        v_start = v
        ritz = best_right[: min(num_ritz, k + 1)].to(device=dev, dtype=dt) @ vs[: k + 1]
        ritz[0] = v
    sigma_t = torch.tensor(sigma, dtype=v.dtype, device=v.device)
    return Triplet(u, v, sigma_t, total, converged, ritz)
