"""Implicit Normalizing Flows (Lu et al., ICLR 2021): ``z`` defined by ``z + g_z(z) = x + g_x(x)``.

With both g contractive the block is ``f = (Id + g_z)^{-1} o (Id + g_x)``: a residual block followed by
an inverse residual block, so

    log |det df/dx| = log det(I + J_gx(x)) - log det(I + J_gz(z)),

each term from the ``estimator`` group.  A conditional block uses ``g_x(x, h)`` and ``g_z(z, h)``, the context
features ``h`` an additive bias inside each g (Lip in x and z < 1 for every h): ``z + g_z(z, h) = x + g_x(x, h)``.
Forward: ``a = x + g_x(x)`` then the root ``z`` of
``z = a - g_z(z)`` (``forward_solver``, :data:`flowforge.solvers.presets.IMPLICIT_FORWARD` by default:
Broyden, tolerance 1e-6, as the reference, with a Picard fallback); gradients reach ``g_x``, ``g_z`` and
``x`` by implicit differentiation, the adjoint ``u (I + J_gz(z)) = dL/dz`` solved by ``backward_solver``
and fed through one re-attached step.  Inverse: ``a = z + g_z(z)`` then ``x = a - g_x(x)``
(``inverse_solver``, :data:`flowforge.solvers.presets.IMPLICIT_INVERSE`: tolerance 1e-5).  Its function
class strictly contains residual flows'; in 1-D every strongly monotone differentiable function.

:func:`ImplicitFlow` builds the model in the residual-flow architecture (vectors: MLP g; images:
multiscale conv g and fully connected blocks) with the typed options of :mod:`flowforge.flows.options`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.estimators.logdet import LogDetEstimator, as_estimator
from flowforge.flows.base import Transform
from flowforge.flows.context import context_features, make_context
from flowforge.flows.contractive_stack import TEST_SIZES, TIGHT_SOLVES_EXACT, contractive_stack
from flowforge.flows.model import Flow
from flowforge.flows.options import GNet, Lipschitz, Solvers, Stack, g_net, with_config
from flowforge.flows.registry import register_family
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.contractive import ContractiveNets
from flowforge.solvers.presets import IMPLICIT_FORWARD, IMPLICIT_INVERSE
from flowforge.solvers.solver import SolverSpec, as_solver

#: the g networks of Implicit Flows' toy and tabular models (Lu et al., 2021): sin activation, coeff 0.99
IMPLICIT_G = GNet(act="sin", coeff=0.99, hidden=(128, 128))
#: their arrangement: 6 blocks on vectors; 2 blocks per scale and 2 fully connected blocks on images
IMPLICIT_STACK = Stack(num_blocks=6, blocks_per_scale=(2, 2, 2), fc_blocks=2)


class ImplicitBlock(Transform):
    """``residual_x = Id + g_x`` then ``residual_z^{-1}`` with ``residual_z = Id + g_z``."""

    def __init__(
        self,
        g_x: nn.Module,
        g_z: nn.Module,
        estimator: LogDetEstimator | None = None,
        forward_solver: SolverSpec = None,
        inverse_solver: SolverSpec = None,
        backward_solver: SolverSpec = None,
        on_fail: str = "warn",
    ):
        super().__init__()
        self.residual_x = ResidualBlock(
            g_x,
            estimator,
            on_fail=on_fail,
            backward_solver=backward_solver,
            inverse_solver=as_solver(inverse_solver, **asdict(IMPLICIT_INVERSE)),
        )
        self.residual_z = ResidualBlock(
            g_z,
            estimator,
            on_fail=on_fail,
            backward_solver=backward_solver,
            inverse_solver=as_solver(forward_solver, **asdict(IMPLICIT_FORWARD)),
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, ld_x = self.residual_x(x, context)
        z, ld_z = self.residual_z.inverse_and_log_det(a, context)
        return z, ld_x + ld_z

    @torch.no_grad()
    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.residual_x.inverse(z + self.residual_z.g_at(z, context), context)

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, ld_z = self.residual_z(z, context)
        x, ld_x = self.residual_x.inverse_and_log_det(a, context)
        return x, ld_z + ld_x


def ImplicitFlow(
    shape: Sequence[int],
    estimator: None | dict | LogDetEstimator = None,
    *,
    g: GNet | str = IMPLICIT_G,
    lipschitz: Lipschitz = Lipschitz(),
    stack: Stack = IMPLICIT_STACK,
    solvers: Solvers = Solvers(),
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    context: Any = None,
    context_net: Any = None,
    **config: Any,
) -> Flow:
    """An ImpFlow: :class:`ImplicitBlock` s, each with two g networks of ``g`` (``sin`` activation and
    coeff 0.99 by default, as the paper's toy and tabular models).

    ``config`` holds flat keys of ``conf/model/impflow.yaml`` (``hidden=[64, 64]``, ``forward_solver={...}``,
    ...), set on the groups by :func:`flowforge.flows.options.with_config`.
    """
    emb = make_context(context, context_net)
    opts = with_config(config, g=g_net(g, IMPLICIT_G), lipschitz=lipschitz, stack=stack, solvers=solvers)
    shape = tuple(int(s) for s in shape)
    est = as_estimator(estimator, math.prod(shape))
    nets = ContractiveNets(g=opts["g"], lipschitz=opts["lipschitz"], context_features=context_features(emb))
    solvers = opts["solvers"]

    def make_block(kind: str, s: tuple, first: bool) -> ImplicitBlock:
        g_x = nets.build(kind, s, first)
        g_z = nets.build(kind, s, first)
        return ImplicitBlock(
            g_x,
            g_z,
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
    ImplicitFlow,
    "impflow",
    title="Implicit Flow (Lu et al., 2021)",
    log_det="estimated",
    conditional=True,
    maintenance=True,
    test=TEST_SIZES,
    exact_test=TIGHT_SOLVES_EXACT,
    smoke={"num_blocks": 2, "hidden": [8], "blocks_per_scale": [1], "channels": 4, "fc_blocks": 1, "fc_hidden": [8]},
)
