"""Residual Flows (Chen et al., 2019) and i-ResNets (Behrmann et al., 2019).

A stack of invertible residual blocks ``y = x + g(x)`` (Lip(g) <= coeff < 1), optionally each
followed by ActNorm, with log-det by the chosen estimator (``estimator`` config group).

- Vectors (2-D toys, tabular): ``[ActNorm ->] [ResBlock(MLP g) [-> ActNorm]] x num_blocks``; the last
  layer of each g starts at zero so every block starts as the identity.
- Images (Residual Flows, Sec. 5): logit -> [squeeze ->] ActNorm -> per scale
  ``[ResBlock(conv g) -> ActNorm] x n`` with g = ``[act ->] conv3x3 -> act -> conv1x1 -> act -> conv3x3``
  (hidden width ``channels``, pre-activation, the network's first block without the leading
  activation); a squeeze between scales (and, with ``factor_out``, half the channels leave after each of
  these squeezes; ``squeeze_first`` adds one squeeze before the first scale); after the last scale
  ``fc_blocks`` fully connected blocks of width
  ``fc_hidden`` on the flattened tensor, each followed by ActNorm.
- :func:`IResNet`: the same skeleton with i-ResNet's choices (ELU, coeff 0.9, truncated series).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flowforge.estimators.logdet import LogDetEstimator, as_estimator
from flowforge.flows.contractive_stack import contractive_stack
from flowforge.flows.model import Flow
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.contractive import ContractiveNets


def ResidualFlow(
    shape: Sequence[int],
    estimator: None | dict | LogDetEstimator = None,
    num_blocks: int = 10,
    hidden: Sequence[int] = (128, 128, 128),
    blocks_per_scale: Sequence[int] = (16, 16, 16),
    channels: int = 512,
    kernels: Sequence[int] = (3, 1, 3),
    fc_blocks: int = 4,
    fc_hidden: Sequence[int] = (128, 128),
    act: str = "lipswish",
    coeff: float = 0.98,
    actnorm: bool = True,
    preact: bool = True,
    squeeze_first: bool = False,
    factor_out: bool = False,
    norm: str = "spectral",
    learn_p: bool = False,
    sn_rtol: float = 1e-3,
    sn_max_iters: int = 200,
    inverse_atol: float = 1e-6,
    inverse_rtol: float = 1e-5,
    inverse_max_iters: int = 1000,
    on_fail: str = "warn",
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    g: str = "mlp",
    depth: int = 3,
    growth: int = 16,
    fc_growth: int = 32,
    fc_g: str | None = None,
    lip_coeff: float = 0.98,
    inverse_solver: None | str | dict = "picard",
) -> Flow:
    """``g=dense`` gives i-DenseNets (Perugachi-Diaz et al., 2021): the same flow with dense g networks
    (``depth``, ``growth``, ``fc_growth``, ``lip_coeff``)."""
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
        norm,
        learn_p,
        depth,
        growth,
        fc_growth,
        lip_coeff,
        dict(sn_rtol=sn_rtol, sn_max_iters=sn_max_iters),
        fc_g,
    )
    inv = dict(
        inverse_atol=inverse_atol,
        inverse_rtol=inverse_rtol,
        inverse_max_iters=inverse_max_iters,
        on_fail=on_fail,
        inverse_solver=inverse_solver,
    )

    def make_block(kind: str, s: tuple, first: bool) -> ResidualBlock:
        return ResidualBlock(nets.build(kind, s, first), est, **inv)

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


def IResNet(
    shape: Sequence[int],
    estimator: None | dict | LogDetEstimator = None,
    act: str = "elu",
    coeff: float = 0.9,
    **kwargs,
) -> Flow:
    """i-ResNet: a residual flow with ELU, coeff 0.9 and (by its config) the truncated power series."""
    return ResidualFlow(shape, estimator=estimator, act=act, coeff=coeff, **kwargs)


from flowforge.flows.registry import register_family  # noqa: E402 (the declaration closes the module)

register_family(
    ResidualFlow,
    "resflow",
    title="Residual Flow (Chen et al., 2019); i-DenseNet with `model.g=dense` (Perugachi-Diaz et al., 2021)",
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
    exact_test=("estimator=exact", "model.inverse_atol=1e-13", "model.inverse_rtol=1e-13"),
    smoke={
        "num_blocks": 2,
        "hidden": [8],
        "blocks_per_scale": [1],
        "channels": 4,
        "fc_blocks": 1,
        "fc_hidden": [8],
        "depth": 2,
        "growth": 4,
        "fc_growth": 8,
    },
)
register_family(
    IResNet,
    "iresnet",
    title="i-ResNet (Behrmann et al., 2019)",
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
    exact_test=("estimator=exact", "model.inverse_atol=1e-13", "model.inverse_rtol=1e-13"),
    smoke={"num_blocks": 2, "hidden": [8], "blocks_per_scale": [1], "channels": 4, "fc_blocks": 1, "fc_hidden": [8]},
)
