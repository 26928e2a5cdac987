"""Monotone Flows (Ahn, Kim, Hong & Kim, NeurIPS 2022): blocks that are Cayley transforms of contractions.

With g contractive (Lip(g) < 1) a monotone block is

    F(x) = 2 (Id + C)^{-1}(x) - x,    C(u) = g(sqrt(2) u) / sqrt(2),

computed as: solve  ``w + g(w) = sqrt(2) x``  for w, return  ``y = sqrt(2) w - x``.  F is maximal and
strongly monotone, ``<F(x) - F(x'), x - x'> > 0``, so invertible; its inverse has the same form:
solve  ``w - g(w) = sqrt(2) y``,  return  ``x = sqrt(2) w - y``  (the same w as the forward).  Since
``dF/dx = (I + J_g(w))^{-1} (I - J_g(w))``,

    log |det dF/dx| = log det(I - J_g(w)) - log det(I + J_g(w)) = -2 sum_{k odd} tr(J_g(w)^k) / k,

estimated with the ``estimator`` group (exact in low dimension; power series / Russian roulette with
Hutchinson probes; the Neumann-style gradient of the odd series; backward-in-forward).  Gradients reach
g's parameters and x through the solve by implicit differentiation (:func:`flowforge.solvers.implicit_solve`).
Solvers: ``forward_solver`` (Anderson with two iterates, i.e. one secant step per iteration, tolerance
1e-6, 2000 iterations, Picard fallback, as the reference), ``inverse_solver`` (the same by default)
and ``backward_solver`` (the adjoint).

:func:`MonotoneFlow` builds the model: i-DenseNet g networks with CPila (``g=dense``) by default, in the
architecture shared with residual flows (:mod:`flowforge.flows.contractive_stack`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowforge.estimators.logdet import LogDetEstimator, as_estimator
from flowforge.flows.contractive_block import BACKWARD_DEFAULTS, ContractiveBlock
from flowforge.flows.contractive_stack import contractive_stack
from flowforge.flows.model import Flow
from flowforge.nn.contractive import ContractiveNets
from flowforge.solvers import as_solver, implicit_solve
from flowforge.solvers.solver import SolverSpec

SQRT2 = math.sqrt(2.0)
FORWARD_DEFAULTS = dict(method="anderson", atol=1e-6, rtol=1e-6, max_iters=2000, memory=2, fallback_iters=2000)


class MonotoneBlock(ContractiveBlock):
    def __init__(
        self,
        g: nn.Module,
        estimator: LogDetEstimator | None = None,
        forward_solver: SolverSpec = None,
        inverse_solver: SolverSpec = None,
        backward_solver: SolverSpec = None,
        on_fail: str = "warn",
    ):
        super().__init__(g, estimator, on_fail)
        self.forward_solver = as_solver(forward_solver, **FORWARD_DEFAULTS)
        self.inverse_solver = as_solver(inverse_solver, **FORWARD_DEFAULTS)
        self.backward_solver = as_solver(backward_solver, **BACKWARD_DEFAULTS)

    def _solve(self, rhs: Tensor, sign: float, kind: str) -> Tensor:
        """``w`` with ``w + sign * g(w) = rhs`` (implicit gradients when grad mode is on)."""
        solver = self.forward_solver if kind == "forward" else self.inverse_solver

        def step(w: Tensor, idx: Tensor) -> Tensor:
            return rhs[idx] - sign * self.g(w)

        with torch.no_grad():
            w0 = rhs - sign * self.g(rhs)
        w, stats = implicit_solve(
            step, w0, solver, self.backward_solver, self.recorder(f"{kind} backward", self.backward_solver)
        )
        self.recorder(kind, solver)(stats)
        return w.to(rhs.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self._solve(SQRT2 * x, 1.0, "forward")
        _, log_det = self.estimate(w, "monotone")
        return SQRT2 * w - x, log_det

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        return SQRT2 * self._solve(SQRT2 * y, -1.0, "inverse") - y

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        w = self._solve(SQRT2 * y, -1.0, "inverse")
        _, log_det = self.estimate(w, "monotone")
        return SQRT2 * w - y, -log_det


def MonotoneFlow(
    shape: Sequence[int],
    estimator: None | dict | LogDetEstimator = None,
    num_blocks: int = 10,
    blocks_per_scale: Sequence[int] = (16, 16, 16),
    fc_blocks: int = 4,
    g: str = "dense",
    act: str = "cpila",
    coeff: float = 0.98,
    depth: int = 3,
    growth: int = 16,
    fc_growth: int = 32,
    fc_g: str | None = None,
    lip_coeff: float = 0.98,
    hidden: Sequence[int] = (128, 128, 128),
    channels: int = 512,
    kernels: Sequence[int] = (3, 1, 3),
    fc_hidden: Sequence[int] = (128, 128),
    preact: bool = True,
    actnorm: bool = True,
    squeeze_first: bool = False,
    factor_out: bool = False,
    sn_rtol: float = 1e-3,
    sn_max_iters: int = 200,
    forward_solver: SolverSpec = None,
    inverse_solver: SolverSpec = None,
    backward_solver: SolverSpec = None,
    on_fail: str = "warn",
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
) -> Flow:
    """A Monotone Flow: :class:`MonotoneBlock` s (i-DenseNet g with CPila by default) in the residual-flow
    architecture (vectors: ``num_blocks`` blocks; images: ``blocks_per_scale`` and ``fc_blocks``)."""
    shape = tuple(int(s) for s in shape)
    est = as_estimator(estimator, math.prod(shape))
    nets = ContractiveNets(
        g,
        act,
        coeff,
        hidden,
        channels,
        kernels,
        fc_hidden,
        preact,
        "spectral",
        False,
        depth,
        growth,
        fc_growth,
        lip_coeff,
        dict(sn_rtol=sn_rtol, sn_max_iters=sn_max_iters),
        fc_g,
    )
    solvers = dict(forward_solver=forward_solver, inverse_solver=inverse_solver, backward_solver=backward_solver)

    def make_block(kind: str, s: tuple, first: bool) -> MonotoneBlock:
        return MonotoneBlock(nets.build(kind, s, first), est, on_fail=on_fail, **solvers)

    return contractive_stack(
        shape,
        make_block,
        num_blocks,
        blocks_per_scale,
        fc_blocks,
        actnorm,
        squeeze_first,
        factor_out,
        base,
        num_levels,
        logit_alpha,
    )


from flowforge.flows.registry import register_family  # noqa: E402 (the declaration closes the module)

register_family(
    MonotoneFlow,
    "monotone",
    title="Monotone Flow (Ahn et al., 2022)",
    log_det="estimated",
    maintenance=True,
    test=(
        "model.num_blocks=2",
        "model.depth=2",
        "model.growth=4",
        "model.fc_g=mlp",
        "model.fc_hidden=[8]",
        "model.blocks_per_scale=[1]",
        "model.fc_blocks=1",
    ),
    exact_test=(
        "estimator=exact",
        *(f"model.{s}_solver.{t}=1e-13" for s in ("forward", "inverse", "backward") for t in ("atol", "rtol")),
        "model.backward_solver.max_iters=1000",
    ),
    smoke={
        "num_blocks": 2,
        "depth": 2,
        "growth": 4,
        "fc_g": "mlp",
        "fc_hidden": [8],
        "blocks_per_scale": [1],
        "fc_blocks": 1,
    },
)
