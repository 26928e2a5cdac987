"""Reference computations used by the test-suite (and available to users who write their own).

Everything here is brute force on purpose: slow, simple, and exact up to floating point.
"""

from __future__ import annotations

import torch
from torch import Tensor


def jacobian_matrix(fn, x: Tensor) -> Tensor:
    """Per-sample full Jacobian ``d fn(x)_i / d x_j`` of a batched map, shape ``(B, D_out, D_in)``.

    Each sample is pushed through ``fn`` alone (batch of one), so ``fn`` must not depend on the
    batch (initialise data-dependent layers such as ActNorm first).
    """
    out = []
    for xi in x:
        def f(v: Tensor, shape=xi.shape) -> Tensor:
            return fn(v.reshape(1, *shape)).reshape(-1)

        out.append(torch.autograd.functional.jacobian(f, xi.reshape(-1)))
    return torch.stack(out)


def batch_jacobian_logdet(transform, x: Tensor) -> Tensor:
    """Brute-force ``log |det df/dx|`` per sample of a transform returning ``(z, log_det)``."""
    return torch.linalg.slogdet(jacobian_matrix(lambda v: transform(v)[0], x))[1]
