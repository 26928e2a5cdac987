"""What a batched iterative solver reports: never an answer without its convergence record."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SolverStats:
    """Per-sample ``iterations`` and ``converged`` flags, the final per-sample step/residual size
    ``residual``, and the tolerance it was held to."""

    iterations: Tensor
    converged: Tensor
    residual: Tensor
    max_iters: int

    @property
    def num_failed(self) -> int:
        return int((~self.converged).sum())

    @property
    def max_iterations(self) -> int:
        return int(self.iterations.max()) if self.iterations.numel() else 0

    def summary(self) -> dict[str, float]:
        return {
            "iterations_mean": float(self.iterations.float().mean()) if self.iterations.numel() else 0.0,
            "iterations_max": float(self.max_iterations),
            "failed": float(self.num_failed),
            "residual_max": float(self.residual.max()) if self.residual.numel() else 0.0,
        }
