"""Hutchinson's trace estimator: ``tr(A) = E_v[v^T A v]`` for probes with ``E[v v^T] = I``.

Probes are standard Gaussian or Rademacher (+-1 with equal probability; lower variance for a fixed
matrix, since ``Var = 2 sum_{i != j} A_ij^2`` instead of ``2 ||A||_F^2``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowforge.errors import ConfigError

PROBES = ("gaussian", "rademacher")


def sample_probe(like: Tensor, kind: str = "gaussian") -> Tensor:
    if kind == "gaussian":
        return torch.randn_like(like)
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    raise ConfigError(f"unknown Hutchinson probe '{kind}'; choose one of {PROBES}")


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product ``<a_b, b_b>`` over all but the batch dimension."""
    return (a * b).reshape(a.shape[0], -1).sum(1)
