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

The options come in typed groups (:mod:`flowforge.flows.options`): ``g`` (:class:`GNet`), ``lipschitz``,
``stack``, ``solvers`` (only ``inverse`` and ``backward``: a residual block's forward pass is explicit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flowforge.errors import ConfigError
from flowforge.estimators.logdet import LogDetEstimator, as_estimator
from flowforge.flows.context import context_features, make_context
from flowforge.flows.contractive_stack import TEST_SIZES, contractive_stack
from flowforge.flows.model import Flow
from flowforge.flows.options import GNet, Lipschitz, Solvers, Stack, g_net, with_config
from flowforge.flows.registry import register_family
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.contractive import ContractiveNets

#: i-ResNet's g (Behrmann et al., 2019): ELU and layer norms of at most 0.9
IRESNET_G = GNet(act="elu", coeff=0.9)
#: the config keys of the inverse solver's options that ``inverse_solver`` leaves out
INVERSE_TOLERANCES = ("inverse_atol", "inverse_rtol", "inverse_max_iters")


def ResidualFlow(
    shape: Sequence[int],
    estimator: None | dict | LogDetEstimator = None,
    *,
    g: GNet | str = GNet(),
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
    """A Residual Flow on data of ``shape``: :class:`ResidualBlock` s with log-det by ``estimator``.

    ``g=GNet(kind="dense", ...)`` gives i-DenseNets (Perugachi-Diaz et al., 2021): the same flow with
    dense g networks.  ``config`` holds flat keys of ``conf/model/resflow.yaml`` (``hidden=[64, 64]``,
    ``g="dense"``, ...), set on the groups by :func:`flowforge.flows.options.with_config`, and
    ``inverse_atol``, ``inverse_rtol``, ``inverse_max_iters``: the options ``inverse_solver`` leaves out.
    """
    emb = make_context(context, context_net)
    tolerances = {key: config.pop(key) for key in INVERSE_TOLERANCES if key in config}
    opts = with_config(config, g=g_net(g, GNet()), lipschitz=lipschitz, stack=stack, solvers=solvers)
    solvers = opts["solvers"]
    if solvers.forward is not None:
        raise ConfigError("residual blocks have no forward solve (y = x + g(x)); set solvers.inverse instead")
    shape = tuple(int(s) for s in shape)
    est = as_estimator(estimator, math.prod(shape))
    nets = ContractiveNets(g=opts["g"], lipschitz=opts["lipschitz"], context_features=context_features(emb))

    def make_block(kind: str, s: tuple, first: bool) -> ResidualBlock:
        return ResidualBlock(
            nets.build(kind, s, first),
            est,
            inverse_solver=solvers.inverse,
            backward_solver=solvers.backward,
            on_fail=solvers.on_fail,
            **tolerances,
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


def IResNet(
    shape: Sequence[int],
    estimator: None | dict | LogDetEstimator = None,
    *,
    g: GNet | str = IRESNET_G,
    context: Any = None,
    context_net: Any = None,
    **options: Any,
) -> Flow:
    """i-ResNet: a residual flow with ELU, coeff 0.9 (:data:`IRESNET_G`) and (by its config) the
    truncated power series; ``options`` as :func:`ResidualFlow` takes them."""
    return ResidualFlow(shape, estimator, g=g_net(g, IRESNET_G), context=context, context_net=context_net, **options)


register_family(
    ResidualFlow,
    "resflow",
    title="Residual Flow (Chen et al., 2019); i-DenseNet with `model.g=dense` (Perugachi-Diaz et al., 2021)",
    log_det="estimated",
    conditional=True,
    maintenance=True,
    test=TEST_SIZES,
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
    conditional=True,
    maintenance=True,
    test=TEST_SIZES,
    exact_test=("estimator=exact", "model.inverse_atol=1e-13", "model.inverse_rtol=1e-13"),
    smoke={"num_blocks": 2, "hidden": [8], "blocks_per_scale": [1], "channels": 4, "fc_blocks": 1, "fc_hidden": [8]},
)
