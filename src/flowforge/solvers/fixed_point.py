"""Batched fixed-point (Picard) iteration ``x_{t+1} = T(x_t)`` with per-sample convergence masks.

Sample b stops once ``max_i |x_{t+1} - x_t|_i <= atol + rtol * max_i |x_{t+1}|_i``; converged samples
are frozen and ``T`` is evaluated only on the samples still running (``T`` must act per sample).  For a
contraction with constant L the error after stopping is at most ``L / (1 - L)`` times the last step.

Used for the inverse of residual blocks, ``x = y - g(x)`` (Behrmann et al., 2019, Alg. 1).
Runs in float32 or wider even under autocast: low-precision arithmetic stalls the iteration far from
the tolerance.  A sample whose iterate becomes NaN/inf is stopped and reported as failed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowforge.solvers.stats import SolverStats

Step = Callable[[Tensor, Tensor], Tensor]


def _per_sample_max(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).abs().amax(1)


def fixed_point(step: Step, x0: Tensor, atol: float = 1e-6, rtol: float = 1e-5, max_iters: int = 1000
                ) -> tuple[Tensor, SolverStats]:
    """Iterate ``x <- step(x_active, index_active)`` from ``x0``; returns ``(x, stats)``.

    ``step(x_sub, idx)`` must return ``T(x)`` for the samples ``idx`` (a LongTensor of batch indices).
    """
    device_type = x0.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        x = x0.float() if x0.dtype in (torch.float16, torch.bfloat16) else x0.clone()
        b = x.shape[0]
        iters = torch.zeros(b, dtype=torch.long, device=x.device)
        converged = torch.zeros(b, dtype=torch.bool, device=x.device)
        failed = torch.zeros(b, dtype=torch.bool, device=x.device)
        residual = torch.full((b,), float("inf"), dtype=x.dtype, device=x.device)
        active = torch.arange(b, device=x.device)
        for _ in range(max_iters):
            if active.numel() == 0:
                break
            x_old = x[active]
            x_new = step(x_old, active)
            dx = _per_sample_max(x_new - x_old)
            finite = torch.isfinite(x_new.reshape(len(active), -1)).all(1) & torch.isfinite(dx)
            x[active] = x_new
            residual[active] = dx
            iters[active] += 1
            done = finite & (dx <= atol + rtol * _per_sample_max(x_new))
            converged[active[done]] = True
            failed[active[~finite]] = True
            active = active[~done & finite]
        converged &= ~failed
    return x, SolverStats(iters, converged, residual, max_iters)
