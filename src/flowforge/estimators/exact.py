"""Exact log-determinants from the full Jacobian of g: ``log |det(I + J_g(x))|`` (residual block) and
``log |det(I - J_g(w))| - log |det(I + J_g(w))|`` (monotone block, ``kind="monotone"``).

The Jacobian is assembled column by column from Jacobian-vector products ``J e_i`` (D products for a
D-dimensional input), then ``slogdet``; differentiable, for low dimensions and for checking estimators.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowforge.errors import ConfigError

MAX_EXACT_DIM = 1024


def full_jacobian(jvp: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``(B, D, D)`` Jacobian of the map whose JVP at ``x`` is ``jvp``."""
    b, d = x.shape[0], x[0].numel()
    if d > MAX_EXACT_DIM:
        raise ConfigError(
            f"the exact log-det needs {d} Jacobian-vector products per block for inputs of dimension {d} "
            f"(limit {MAX_EXACT_DIM}); use estimator=roulette or estimator=power_series"
        )
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    cols = [jvp(eye[i].expand(b, d).reshape_as(x)).reshape(b, d) for i in range(d)]
    return torch.stack(cols, dim=2)


def _logdet_shifted(j: Tensor, sign: float) -> Tensor:
    """``log |det(I + sign J)|`` per sample."""
    if j.shape[1] == 2:  # closed form, cheaper than slogdet for the 2-D toys
        det = (1 + sign * j[:, 0, 0]) * (1 + sign * j[:, 1, 1]) - j[:, 0, 1] * j[:, 1, 0]
        return torch.log(det.abs())
    eye = torch.eye(j.shape[1], dtype=j.dtype, device=j.device)
    return torch.linalg.slogdet(eye + sign * j)[1]


def exact_logdet(jvp: Callable[[Tensor], Tensor], x: Tensor, kind: str = "residual") -> Tensor:
    j = full_jacobian(jvp, x)
    if kind == "monotone":
        return _logdet_shifted(j, -1.0) - _logdet_shifted(j, 1.0)
    return _logdet_shifted(j, 1.0)
