"""What residual and monotone blocks share: a contractive network g, its log-det estimator, solver records.

A :class:`ContractiveBlock` owns
- ``g`` (Lip(g) < 1) and ``logdet_estimator`` (the ``estimator`` config group); :meth:`estimate` returns
  ``(g(x), log-det)`` for ``kind="residual"`` (``log det(I + J_g)``) or ``"monotone"``
  (``log det(I - J_g) - log det(I + J_g)``);
- the roulette distribution's parameters as frozen per-block parameters ``roulette_logit_p`` = logit(p)
  and ``roulette_lam``, as the reference implementation does (the published parameter counts include
  them);
- ``solves``: the last :class:`flowforge.solvers.SolverStats` of each solve (``forward``, ``inverse``,
  their ``backward`` adjoints) and failure counts; an unconverged solve warns with the count or, with
  ``on_fail="raise"``, raises :class:`flowforge.errors.ConvergenceError`.

A conditional block reads the context features ``h`` in g only (``g(x, h)``, the context an additive bias of
g's first normalised layer, so Lip_x(g(., h)) < 1 for every h); the estimators and solvers see the map
``x -> g(x, h)`` at fixed h (:class:`GivenContext`) and differentiate in x only, so the log-det is
``log det(I + J_g(x; h))`` with the unconditional estimators.  Gradients reach h through the same graphs.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.estimators.logdet import LogDetEstimator
from flowforge.estimators.roulette import RouletteDistribution
from flowforge.flows.base import Transform
from flowforge.solvers import Solver, SolveRecord, SolverStats, check_convergence
from flowforge.solvers.solver import check_on_fail


class GivenContext:
    """``x -> g(x, h)`` at fixed context features ``h``: the network a log-det estimator or solver closes over.

    ``linearize(x)`` is g's own linearisation at h (or forward-mode autograd); ``parameters()`` yields g's
    parameters and ``h`` when it requires a gradient, so backward-in-forward also returns h's gradient."""

    def __init__(self, g: nn.Module, context: Tensor):
        self.g, self.context = g, context

    def __call__(self, x: Tensor) -> Tensor:
        return self.g(x, self.context)

    def linearize(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        if hasattr(self.g, "linearize"):
            return self.g.linearize(x, self.context)
        return self(x), lambda v: torch.func.jvp(self, (x,), (v,))[1]

    def parameters(self) -> Iterator[Tensor]:
        yield from self.g.parameters()
        if self.context.requires_grad:
            yield self.context


class ContractiveBlock(Transform):
    hint = "check that Lip(g) < 1 (spectral norms) or raise the solver's max_iters"

    def __init__(self, g: nn.Module, estimator: LogDetEstimator | None = None, on_fail: str = "warn"):
        super().__init__()
        self.on_fail = check_on_fail(on_fail)
        self.g = g
        self.logdet_estimator = estimator or LogDetEstimator("roulette")
        r = self.logdet_estimator.roulette
        self.roulette_logit_p = nn.Parameter(torch.tensor(math.log(r.p) - math.log1p(-r.p)), requires_grad=False)
        self.roulette_lam = nn.Parameter(torch.tensor(r.lam), requires_grad=False)
        self._refresh_roulette()
        self.solves = SolveRecord()
        self.last_terms = 0

    def _refresh_roulette(self) -> None:
        r = self.logdet_estimator.roulette
        # host sync: at construction and once per state-dict load, so the roulette draw reads nothing per step
        p, lam = float(torch.sigmoid(self.roulette_logit_p)), float(self.roulette_lam)
        self._roulette_dist = RouletteDistribution(r.dist, p, lam)

    def _roulette(self) -> RouletteDistribution:
        """The distribution from the block's frozen roulette parameters, kept on the host (set at construction
        and when a state dict is loaded), so a forward never reads them from the device."""
        return self._roulette_dist

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_roulette()

    def g_at(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``g(x)``, or ``g(x, h)`` for a conditional block."""
        return self.g(x) if context is None else self.g(x, context)

    def estimate(self, x: Tensor, kind: str = "residual", context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(g(x), log-det of the given kind at x)`` with the block's estimator (at fixed ``context``)."""
        roulette = self._roulette() if self.logdet_estimator.name == "roulette" else None
        g = self.g if context is None else GivenContext(self.g, context)
        gx, log_det, info = self.logdet_estimator(g, x, training=self.training, roulette=roulette, kind=kind)
        self.last_terms = info["terms"]
        return gx, log_det

    def recorder(self, kind: str, solver: Solver) -> Callable[[SolverStats], None]:
        """Records a solve's stats under ``kind`` and applies the failure policy."""

        def record(stats: SolverStats) -> None:
            self.solves.add(kind, stats)
            check_convergence(stats, f"{type(self).__name__} {kind}", solver, on_fail=self.on_fail, hint=self.hint)

        return record


#: the contractive blocks of each model :func:`solve_records` has walked (a model's blocks do not change once built)
_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def solve_records(module: nn.Module) -> Iterator[tuple[str, str, Any]]:
    """``(block name, kind, stats)`` of every solve the blocks of ``module`` recorded in their latest step: the
    one walk over the records (kinds such as ``forward``, ``inverse``, ``forward backward``; ``stats`` has
    ``iterations`` and ``converged`` per sample)."""
    blocks = _BLOCKS.get(module)
    if blocks is None:  # the walk over the module tree runs once per model, not once per training step
        blocks = _BLOCKS[module] = [(name, m) for name, m in module.named_modules() if isinstance(m, ContractiveBlock)]
    for name, m in blocks:
        for kind, stats in m.solves.last.items():
            yield name, kind, stats


def solver_summary(module: nn.Module) -> dict[str, float]:
    """Mean iterations per sample of the latest solve of each kind, averaged over the blocks in ``module``
    (``iters/<kind>``, kinds such as ``forward``, ``inverse``, ``forward backward``), and the samples
    that failed to converge so far, over all blocks and kinds (``failures``); ``{}`` without solves."""
    per_kind: dict[str, list[float]] = {}
    found = False
    for _, kind, stats in solve_records(module):
        found = True
        if stats.iterations.numel():
            per_kind.setdefault(kind, []).append(float(stats.iterations.float().mean()))
    if not found:
        return {}
    failures = sum(sum(m.solves.failures.values()) for m in module.modules() if isinstance(m, ContractiveBlock))
    out = {f"iters/{k.replace(' ', '_')}": sum(v) / len(v) for k, v in per_kind.items()}
    out["failures"] = float(failures)
    return out


def clear_solve_records(module: nn.Module) -> None:
    """Forget the latest stats (failure counts are kept), so a summary reflects one step only."""
    for m in module.modules():
        if isinstance(m, ContractiveBlock):
            m.solves.last.clear()
