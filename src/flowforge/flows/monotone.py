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
Solvers: ``forward_solver`` and ``inverse_solver`` (:data:`flowforge.solvers.presets.MONOTONE` by default:
Anderson with two iterates, i.e. one secant step per iteration, tolerance 1e-6, 2000 iterations, Picard
fallback, as the reference) and ``backward_solver`` (the adjoint, :data:`flowforge.solvers.presets.ADJOINT`).

:func:`MonotoneFlow` builds the model: i-DenseNet g networks with CPila (:data:`MONOTONE_G`) by default, in
the architecture shared with residual flows (:mod:`flowforge.flows.contractive_stack`), with the typed
options of :mod:`flowforge.flows.options`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.estimators.logdet import LogDetEstimator, as_estimator
from flowforge.flows.context import context_features, make_context
from flowforge.flows.contractive_block import ContractiveBlock
from flowforge.flows.contractive_stack import TIGHT_SOLVES_EXACT, contractive_stack
from flowforge.flows.model import Flow
from flowforge.flows.options import GNet, Lipschitz, Solvers, Stack, g_net, with_config
from flowforge.flows.registry import register_family
from flowforge.nn.contractive import ContractiveNets
from flowforge.solvers import as_solver, implicit_solve
from flowforge.solvers.presets import ADJOINT, MONOTONE
from flowforge.solvers.solver import SolverSpec

SQRT2 = math.sqrt(2.0)
#: Monotone Flows' g (Ahn et al., 2022): an i-DenseNet with CPila
MONOTONE_G = GNet(kind="dense", act="cpila")


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
        self.forward_solver = as_solver(forward_solver, **asdict(MONOTONE))
        self.inverse_solver = as_solver(inverse_solver, **asdict(MONOTONE))
        self.backward_solver = as_solver(backward_solver, **asdict(ADJOINT))

    def _solve(self, rhs: Tensor, sign: float, kind: str, context: Tensor | None = None) -> Tensor:
        """``w`` with ``w + sign * g(w, h) = rhs`` (implicit gradients when grad mode is on)."""
        solver = self.forward_solver if kind == "forward" else self.inverse_solver

        if context is None:

            def step(w: Tensor, idx: Tensor) -> Tensor:
                return rhs[idx] - sign * self.g(w)

        else:

            def step(w: Tensor, idx: Tensor) -> Tensor:
                return rhs[idx] - sign * self.g(w, context[idx])

        with torch.no_grad():
            w0 = rhs - sign * self.g_at(rhs, context)
        on_backward = self.recorder(f"{kind} backward", self.backward_solver)
        w, stats = implicit_solve(step, w0, forward=solver, backward=self.backward_solver, on_backward=on_backward)
        self.recorder(kind, solver)(stats)
        return w.to(rhs.dtype)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w = self._solve(SQRT2 * x, 1.0, "forward", context)
        _, log_det = self.estimate(w, "monotone", context)
        return SQRT2 * w - x, log_det

    @torch.no_grad()
    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return SQRT2 * self._solve(SQRT2 * y, -1.0, "inverse", context) - y

    def inverse_and_log_det(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w = self._solve(SQRT2 * y, -1.0, "inverse", context)
        _, log_det = self.estimate(w, "monotone", context)
        return SQRT2 * w - y, -log_det


def MonotoneFlow(
    shape: Sequence[int],
    estimator: None | dict | LogDetEstimator = None,
    *,
    g: GNet | str = MONOTONE_G,
    lipschitz: Lipschitz = Lipschitz(),
    stack: Stack = Stack(),
    solvers: Solvers = Solvers(),
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    context: Any = None,
    context_net: Any = None,
    **config: Any,
) -> Flow:
    """A Monotone Flow: :class:`MonotoneBlock` s in the residual-flow architecture (vectors:
    ``stack.num_blocks`` blocks; images: ``stack.blocks_per_scale`` and ``stack.fc_blocks``).

    ``config`` holds flat keys of ``conf/model/monotone.yaml`` (``growth=8``, ``g="mlp"``, ...), set on the
    groups by :func:`flowforge.flows.options.with_config`.  The blocks are monotone when Lip(g) < 1 in the
    Euclidean norm, so ``lipschitz.norm`` must be ``spectral``.
    """
    emb = make_context(context, context_net)
    opts = with_config(config, g=g_net(g, MONOTONE_G), lipschitz=lipschitz, stack=stack, solvers=solvers)
    if opts["lipschitz"].norm != "spectral":
        raise ConfigError(
            f"monotone blocks need Lip(g) < 1 in the Euclidean norm: norm=spectral, got {opts['lipschitz'].norm}"
        )
    shape = tuple(int(s) for s in shape)
    est = as_estimator(estimator, math.prod(shape))
    nets = ContractiveNets(g=opts["g"], lipschitz=opts["lipschitz"], context_features=context_features(emb))
    solvers = opts["solvers"]

    def make_block(kind: str, s: tuple, first: bool) -> MonotoneBlock:
        return MonotoneBlock(
            nets.build(kind, s, first),
            est,
            **solvers.block_options(),
        )

    return contractive_stack(
        shape,
        make_block,
        stack=opts["stack"],
        base=base,
        num_levels=num_levels,
        logit_alpha=logit_alpha,
        context=emb,
    )


register_family(
    MonotoneFlow,
    "monotone",
    title="Monotone Flow (Ahn et al., 2022)",
    log_det="estimated",
    conditional=True,
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
    exact_test=TIGHT_SOLVES_EXACT,
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
