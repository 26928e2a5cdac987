"""Batched fixed-point solvers (Picard, Anderson, Broyden) with per-sample convergence records, and
implicit differentiation through their solutions."""

from flowforge.solvers.implicit import implicit_solve
from flowforge.solvers.solver import METHODS, Solver, SolveRecord, as_solver, check_convergence
from flowforge.solvers.stats import SolverStats

__all__ = ["METHODS", "SolveRecord", "Solver", "SolverStats", "as_solver", "check_convergence", "implicit_solve"]
