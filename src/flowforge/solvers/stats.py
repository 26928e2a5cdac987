"""What a batched iterative solver reports: never an answer without its convergence record."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SolverStats:
    """Per-sample ``iterations`` (evaluations of the map) and ``converged`` flags, the final per-sample
    residual ``max_i |T(x)_i - x_i|`` (``residual``), the iteration cap, the method's name and the samples
    stopped early for lack of progress (``stalled``, see :mod:`flowforge.solvers.iteration`)."""

    iterations: Tensor
    converged: Tensor
    residual: Tensor
    max_iters: int
    method: str = "picard"
    stalled: Tensor | None = None

    @property
    def num_stalled(self) -> int:
        return 0 if self.stalled is None else int(self.stalled.sum())

    @property
    def num_failed(self) -> int:
        return int((~self.converged).sum())

    @property
    def max_iterations(self) -> int:
        return int(self.iterations.max()) if self.iterations.numel() else 0

    def merge(self, other: SolverStats, idx: Tensor) -> SolverStats:
        """These stats with the samples ``idx`` continued by a second run (``other``, over ``idx`` only)."""
        iterations = self.iterations.clone()
        iterations[idx] += other.iterations
        converged, residual = self.converged.clone(), self.residual.clone()
        converged[idx], residual[idx] = other.converged, other.residual
        stalled = torch.zeros_like(converged)
        stalled[idx] = other.stalled if other.stalled is not None else False
        return SolverStats(
            iterations, converged, residual, self.max_iters + other.max_iters, f"{self.method}+{other.method}", stalled
        )
