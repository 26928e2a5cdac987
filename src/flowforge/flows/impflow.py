"""Implicit Normalizing Flows (Lu et al., ICLR 2021): ``z`` defined by ``z + g_z(z) = x + g_x(x)``.

With both g contractive the block is ``f = (Id + g_z)^{-1} o (Id + g_x)``: a residual block followed by
an inverse residual block, so

    log |det df/dx| = log det(I + J_gx(x)) - log det(I + J_gz(z)),

each term from the ``estimator`` group.  Forward: ``a = x + g_x(x)`` then the root ``z`` of
``z = a - g_z(z)`` (``forward_solver``: Broyden, tolerance 1e-6, as the reference, with a Picard
fallback); gradients reach ``g_x``, ``g_z`` and ``x`` by implicit differentiation, the adjoint
``u (I + J_gz(z)) = dL/dz`` solved by ``backward_solver`` and fed through one re-attached step.  Inverse:
``a = z + g_z(z)`` then ``x = a - g_x(x)`` (``inverse_solver``, tolerance 1e-5).  Its function class
strictly contains residual flows'; in 1-D every strongly monotone differentiable function.

:func:`ImplicitFlow` builds the model in the residual-flow architecture (vectors: MLP g; images:
multiscale conv g and fully connected blocks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowforge.estimators.logdet import LogDetEstimator, as_estimator
from flowforge.flows.base import Transform
from flowforge.flows.contractive_stack import contractive_stack
from flowforge.flows.model import Flow
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.contractive import ContractiveNets
from flowforge.solvers.solver import SolverSpec, as_solver

FORWARD_DEFAULTS = dict(method="broyden", atol=1e-6, rtol=1e-6, max_iters=100, memory=30, fallback_iters=1000)
INVERSE_DEFAULTS = dict(method="broyden", atol=1e-5, rtol=1e-5, max_iters=100, memory=30, fallback_iters=1000)


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
            inverse_solver=as_solver(inverse_solver, **INVERSE_DEFAULTS),
        )
        self.residual_z = ResidualBlock(
            g_z,
            estimator,
            on_fail=on_fail,
            backward_solver=backward_solver,
            inverse_solver=as_solver(forward_solver, **FORWARD_DEFAULTS),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, ld_x = self.residual_x(x)
        z, ld_z = self.residual_z.inverse_and_log_det(a)
        return z, ld_x + ld_z

    @torch.no_grad()
    def inverse(self, z: Tensor) -> Tensor:
        return self.residual_x.inverse(z + self.residual_z.g(z))

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        a, ld_z = self.residual_z(z)
        x, ld_x = self.residual_x.inverse_and_log_det(a)
        return x, ld_z + ld_x


def ImplicitFlow(
    shape: Sequence[int],
    estimator: None | dict | LogDetEstimator = None,
    num_blocks: int = 6,
    hidden: Sequence[int] = (128, 128),
    blocks_per_scale: Sequence[int] = (2, 2, 2),
    channels: int = 512,
    kernels: Sequence[int] = (3, 1, 3),
    fc_blocks: int = 2,
    fc_hidden: Sequence[int] = (128, 128),
    act: str = "sin",
    coeff: float = 0.99,
    actnorm: bool = True,
    preact: bool = True,
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
    """An ImpFlow: :class:`ImplicitBlock` s with the residual-flow g networks (``sin`` activation and
    coeff 0.99 by default, as the paper's toy and tabular models)."""
    shape = tuple(int(s) for s in shape)
    est = as_estimator(estimator, math.prod(shape))
    nets = ContractiveNets(
        "mlp",
        act,
        coeff,
        hidden,
        channels,
        kernels,
        fc_hidden,
        preact,
        "spectral",
        False,
        sn=dict(sn_rtol=sn_rtol, sn_max_iters=sn_max_iters),
    )
    solvers = dict(forward_solver=forward_solver, inverse_solver=inverse_solver, backward_solver=backward_solver)

    def make_block(kind: str, s: tuple, first: bool) -> ImplicitBlock:
        return ImplicitBlock(nets.build(kind, s, first), nets.build(kind, s, first), est, on_fail=on_fail, **solvers)

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
    ImplicitFlow,
    "impflow",
    title="Implicit Flow (Lu et al., 2021)",
    log_det="estimated",
    maintenance=True,
    test=(
        "model.num_blocks=2",
        "model.hidden=[8]",
        "model.blocks_per_scale=[1]",
        "model.channels=4",
        "model.fc_blocks=1",
        "model.fc_hidden=[8]",
    ),
    exact_test=(
        "estimator=exact",
        *(f"model.{s}_solver.{t}=1e-13" for s in ("forward", "inverse", "backward") for t in ("atol", "rtol")),
        "model.backward_solver.max_iters=1000",
    ),
    smoke={"num_blocks": 2, "hidden": [8], "blocks_per_scale": [1], "channels": 4, "fc_blocks": 1, "fc_hidden": [8]},
)
