"""Iterative solvers for implicit maps (fixed point), with per-sample convergence records."""

from flowforge.solvers.fixed_point import fixed_point
from flowforge.solvers.stats import SolverStats

__all__ = ["SolverStats", "fixed_point"]
