"""One configurable entry point for the fixed-point methods, and the failure policy.

``Solver(method, atol, rtol, max_iters, ...)(step, x0) -> (x, stats)`` solves ``x = T(x)`` batched with
per-sample masks (see :mod:`flowforge.solvers.iteration`):

- ``picard``: ``x <- (1 - damping) x + damping T(x)``;
- ``anderson``: Anderson acceleration with ``memory`` past iterates (and ``damping``);
- ``broyden``: limited-memory Broyden with ``memory`` rank-one updates.

``patience`` stops a sample whose residual has not improved for that many iterations (0: never).
``fallback_iters > 0`` continues the samples an accelerated method left unconverged with that many
Picard iterations from their best iterate (the reference implementations do this).  Samples that
still fail are never passed off as answers: :func:`check_convergence` warns with the count or raises
:class:`flowforge.errors.ConvergenceError`, as the caller's ``on_fail`` says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor

from flowforge.errors import ConfigError, ConvergenceError
from flowforge.solvers.anderson import Anderson
from flowforge.solvers.broyden import Broyden
from flowforge.solvers.iteration import Step, iterate
from flowforge.solvers.picard import Picard
from flowforge.solvers.stats import SolverStats

log = logging.getLogger("flowforge")

METHODS = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}
ON_FAIL = ("warn", "raise")


@dataclass(frozen=True)
class Solver:
    method: str = "anderson"
    atol: float = 1e-6
    rtol: float = 1e-5
    max_iters: int = 1000
    damping: float = 1.0
    memory: int = 5
    fallback_iters: int = 0
    patience: int = 100

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown solver method '{self.method}'; choose one of {sorted(METHODS)}")
        for key in ("atol", "rtol"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"solver {key} must be a number >= 0, got {v!r}")
        if self.atol == 0 and self.rtol == 0:
            raise ConfigError("solver atol and rtol are both 0: the iteration could never stop; set e.g. atol=1e-6")
        for key, low in (("max_iters", 1), ("memory", 1), ("fallback_iters", 0), ("patience", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"solver {key} must be an integer >= {low}, got {v!r}")
        if not 0 < self.damping <= 1:
            raise ConfigError(f"solver damping must lie in (0, 1], got {self.damping}")

    def _factory(self, method: str):
        if method == "picard":
            return partial(Picard, damping=self.damping)
        if method == "anderson":
            return partial(Anderson, memory=self.memory, damping=self.damping)
        return partial(Broyden, memory=self.memory)

    def __call__(self, step: Step, x0: Tensor) -> tuple[Tensor, SolverStats]:
        x, stats = iterate(self._factory(self.method), step, x0, self.atol, self.rtol, self.max_iters, self.patience)
        if self.fallback_iters and self.method != "picard" and stats.num_failed:
            idx = (~stats.converged).nonzero().squeeze(1)

            def sub_step(x_sub: Tensor, j: Tensor) -> Tensor:
                return step(x_sub, idx[j])

            x_fb, fb = iterate(
                self._factory("picard"), sub_step, x[idx], self.atol, self.rtol, self.fallback_iters, self.patience
            )
            x = x.clone()
            x[idx] = x_fb.to(x.dtype)
            stats = stats.merge(fb, idx)
        return x, stats


SolverSpec = None | str | dict | Solver


def as_solver(spec: SolverSpec, **defaults: Any) -> Solver:
    """A :class:`Solver` from a method name, a config mapping (Hydra node) or a Solver; ``defaults``
    fill the keys the mapping leaves out."""
    if isinstance(spec, Solver):
        return spec
    if spec is None:
        spec = {}
    elif isinstance(spec, str):
        spec = {"method": spec}
    try:
        spec = {str(k): v for k, v in dict(spec).items() if not str(k).startswith("_")}
    except (TypeError, ValueError):
        raise ConfigError(f"a solver is given by a method name or a mapping, got {spec!r}") from None
    unknown = set(spec) - set(Solver.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown solver options {sorted(unknown)}; valid: {sorted(Solver.__dataclass_fields__)}")
    return Solver(**{**defaults, **spec})


def check_on_fail(on_fail: str) -> str:
    if on_fail not in ON_FAIL:
        raise ConfigError(f"on_fail must be one of {ON_FAIL}, got '{on_fail}'")
    return on_fail


def check_convergence(stats: SolverStats, what: str, solver: Solver, on_fail: str, hint: str = "") -> None:
    """Warn (``on_fail="warn"``) or raise :class:`ConvergenceError` (``"raise"``) when samples failed."""
    if not stats.num_failed:
        return
    n = stats.converged.numel()
    stalled = (
        f", {stats.num_stalled} of them stopped after {solver.patience} iterations without progress"
        if stats.num_stalled
        else ""
    )
    msg = (
        f"{what}: {stats.num_failed} of {n} samples did not converge in {stats.max_iters} {stats.method} "
        f"iterations{stalled} (largest residual {float(stats.residual.max()):.3g}; tolerance atol={solver.atol}, "
        f"rtol={solver.rtol})"
    )
    if stats.num_stalled:
        msg += "; the tolerance may be below what the precision resolves: loosen atol/rtol or solve in float64"
    if hint:
        msg += f"; {hint}"
    if on_fail == "raise":
        raise ConvergenceError(msg)
    log.warning(msg)


class SolveRecord:
    """The last stats of each solve a block runs (``forward``, ``inverse``, ``backward``) and the number
    of samples that failed so far, per kind."""

    def __init__(self):
        self.last: dict[str, SolverStats] = {}
        self.failures: dict[str, int] = {}

    def add(self, kind: str, stats: SolverStats) -> None:
        self.last[kind] = stats
        self.failures[kind] = self.failures.get(kind, 0) + stats.num_failed

    def get(self, kind: str) -> SolverStats | None:
        return self.last.get(kind)
