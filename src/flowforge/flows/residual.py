"""Invertible residual block (Behrmann et al., 2019; Chen et al., 2019): ``y = x + g(x)``, Lip(g) < 1.

Forward: ``(x + g(x), log det(I + J_g(x)))`` with the configured :class:`LogDetEstimator`.
Inverse: the fixed point of ``x = y - g(x)`` from ``x_0 = y - g(y)`` with the block's ``inverse_solver``
(:data:`flowforge.solvers.presets.RESIDUAL_INVERSE` by default: Picard, the Banach iteration of Behrmann
et al., 2019; Anderson or Broyden on request), per-sample convergence masks and the tolerance
``|T(x) - x| <= atol + rtol |T(x)|``; iterations and failures are kept in ``last_inverse`` and counted in
``inverse_failures``.  With ``on_fail="raise"`` an unconverged sample raises :class:`ConvergenceError`;
with ``"warn"`` (default) a warning names the count and the result is returned with its record.

:meth:`inverse_and_log_det` is differentiable: gradients reach ``g``'s parameters and ``y`` by implicit
differentiation (:func:`flowforge.solvers.implicit_solve`, adjoint solved by ``backward_solver``), which
is what an implicit flow's ``(Id + g_z)^{-1}`` half needs.

The estimator, the roulette parameters and the solve records come from
:class:`flowforge.flows.contractive_block.ContractiveBlock`.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import Tensor, nn

from flowforge.estimators.logdet import LogDetEstimator
from flowforge.flows.contractive_block import ContractiveBlock
from flowforge.solvers import SolverStats, as_solver, implicit_solve
from flowforge.solvers.presets import ADJOINT, RESIDUAL_INVERSE
from flowforge.solvers.solver import SolverSpec


class ResidualBlock(ContractiveBlock):
    hint = "check that Lip(g) < 1 (spectral norms) or raise inverse_max_iters"

    def __init__(
        self,
        g: nn.Module,
        estimator: LogDetEstimator | None = None,
        inverse_atol: float | None = None,
        inverse_rtol: float | None = None,
        inverse_max_iters: int | None = None,
        on_fail: str = "warn",
        inverse_solver: SolverSpec = None,
        backward_solver: SolverSpec = None,
    ):
        """``inverse_solver`` takes the options it leaves out from ``inverse_atol``, ``inverse_rtol``,
        ``inverse_max_iters`` where given, else from :data:`flowforge.solvers.presets.RESIDUAL_INVERSE`;
        ``backward_solver`` from :data:`flowforge.solvers.presets.ADJOINT`."""
        super().__init__(g, estimator, on_fail)
        given = dict(atol=inverse_atol, rtol=inverse_rtol, max_iters=inverse_max_iters)
        tolerances = {k: v for k, v in given.items() if v is not None}
        self.inverse_solver = as_solver(inverse_solver, **{**asdict(RESIDUAL_INVERSE), **tolerances})
        self.backward_solver = as_solver(backward_solver, **asdict(ADJOINT))

    @property
    def last_inverse(self) -> SolverStats | None:
        return self.solves.get("inverse")

    @property
    def inverse_failures(self) -> int:
        return self.solves.failures.get("inverse", 0)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        gx, log_det = self.estimate(x, context=context)
        return x + gx, log_det

    def solve_inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` with ``x + g(x, h) = y``; differentiable by implicit differentiation when grad mode is on."""

        if context is None:

            def step(x_sub: Tensor, idx: Tensor) -> Tensor:
                return y[idx] - self.g(x_sub)

        else:

            def step(x_sub: Tensor, idx: Tensor) -> Tensor:
                return y[idx] - self.g(x_sub, context[idx])

        with torch.no_grad():
            x0 = y - self.g_at(y, context)
        on_backward = self.recorder("inverse backward", self.backward_solver)
        x, stats = implicit_solve(
            step, x0, forward=self.inverse_solver, backward=self.backward_solver, on_backward=on_backward
        )
        self.recorder("inverse", self.inverse_solver)(stats)
        return x.to(y.dtype)

    @torch.no_grad()
    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.solve_inverse(y, context)

    def inverse_and_log_det(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, -log det(I + J_g(x)))``, differentiable in ``y``, the context and the parameters."""
        x = self.solve_inverse(y, context)
        _, log_det = self.estimate(x, context=context)
        return x, -log_det
