"""The batched driver shared by every fixed-point method: find ``x = T(x)`` sample by sample.

Each sample b keeps its own iterate ``x_b``, map value ``f_b = T(x_b)`` and residual
``r_b = max_i |f_b,i - x_b,i|``, and stops once

    r_b <= atol + rtol * max_i |f_b,i|.

Converged samples are frozen and ``T`` is evaluated only on the samples still running, so the map must
act per sample (``step(x_sub, idx)`` returns ``T(x)`` for the batch indices ``idx``).  All running
samples have taken the same number of steps, so a method's history buffers are aligned across them.
The answer for a sample is ``T(x)`` at its converged iterate, or at the iterate with the smallest
residual when it did not converge (the record says so).  Arithmetic runs in float32 or wider with
autocast off: low precision stalls far from the tolerance.  A sample whose iterate becomes NaN/inf is
stopped and reported as failed.  With ``patience > 0`` a sample whose smallest residual has not
improved for ``patience`` iterations is stopped as well (unconverged, counted in ``stats.stalled``):
this happens when the tolerance lies below what the floating-point precision can resolve, e.g. 1e-6 on
iterates of size ~10 in float32 with a contraction constant near 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from flowforge.solvers.stats import SolverStats

Step = Callable[[Tensor, Tensor], Tensor]


class Method(Protocol):
    """A fixed-point update: ``next(idx, k, x, f)`` proposes the next iterate of the running samples
    ``idx`` (step ``k``) from their iterate ``x`` and map value ``f = T(x)``, shapes ``(len(idx), n)``."""

    name: str

    def next(self, idx: Tensor, k: int, x: Tensor, f: Tensor) -> Tensor: ...


def iterate(
    method_factory: Callable[[int, int, torch.dtype, torch.device], Method],
    step: Step,
    x0: Tensor,
    atol: float,
    rtol: float,
    max_iters: int,
    patience: int = 0,
) -> tuple[Tensor, SolverStats]:
    """Run a method from ``x0`` (shape ``(B, ...)``); returns ``(x, stats)`` with ``x`` of ``x0``'s shape
    (float32 when ``x0`` was half precision)."""
    with torch.autocast(device_type=x0.device.type, enabled=False):
        x = x0.detach().float() if x0.dtype in (torch.float16, torch.bfloat16) else x0.detach().clone()
        shape, b = x.shape[1:], x.shape[0]
        x = x.reshape(b, -1)
        method = method_factory(b, x.shape[1], x.dtype, x.device)

        def evaluate(xs: Tensor, idx: Tensor) -> Tensor:
            return step(xs.reshape(len(idx), *shape), idx).reshape(len(idx), -1).to(x.dtype)

        active = torch.arange(b, device=x.device)
        f = evaluate(x, active) if max_iters > 0 else x.clone()
        out, best = f.clone(), torch.full((b,), float("inf"), dtype=x.dtype, device=x.device)
        iters = torch.full((b,), 1 if max_iters > 0 else 0, dtype=torch.long, device=x.device)
        converged = torch.zeros(b, dtype=torch.bool, device=x.device)
        failed = torch.zeros(b, dtype=torch.bool, device=x.device)
        stalled = torch.zeros(b, dtype=torch.bool, device=x.device)
        stale = torch.zeros(b, dtype=torch.long, device=x.device)
        k = 0
        while active.numel():
            xa, fa = x[active], f[active]
            res = (fa - xa).abs().amax(1)
            finite = torch.isfinite(fa).all(1) & torch.isfinite(res)
            better = finite & (res < best[active])
            out[active[better]], best[active[better]] = fa[better], res[better]
            stale[active] = torch.where(better, 0, stale[active] + 1)
            done = finite & (res <= atol + rtol * fa.abs().amax(1))
            converged[active[done]] = True
            failed[active[~finite]] = True
            keep = ~done & finite
            if patience > 0:
                stuck = keep & (stale[active] > patience)
                stalled[active[stuck]] = True
                keep &= ~stuck
            active, xa, fa = active[keep], xa[keep], fa[keep]
            if not active.numel() or k + 1 >= max_iters:
                break
            x_next = method.next(active, k, xa, fa)
            x[active] = x_next
            f[active] = evaluate(x_next, active)
            iters[active] += 1
            k += 1
        converged &= ~failed
        best[failed & ~torch.isfinite(best)] = float("inf")
    return out.reshape(b, *shape), SolverStats(iters, converged, best, max_iters, method.name, stalled)
