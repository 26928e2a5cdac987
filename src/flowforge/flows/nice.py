"""NICE (Dinh et al., 2015): additive couplings ``z_2 = x_2 + t(x_1)`` (volume preserving) followed
by a learned diagonal scaling ``z = (x + b) exp(s)`` (here an :class:`ActNorm` without data init),
whose log-determinant ``sum s`` is the model's only volume change."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flowforge.flows.actnorm import ActNorm
from flowforge.flows.architectures import coupling_stack
from flowforge.flows.base import Compose
from flowforge.flows.context import context_features, make_context
from flowforge.flows.elementwise import Additive
from flowforge.flows.model import Flow, build_flow
from flowforge.flows.registry import register_family


def NICE(
    shape: Sequence[int],
    num_steps: int = 4,
    hidden: Sequence[int] = (64, 64),
    channels: int = 64,
    num_scales: int = 2,
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    context: Any = None,
    context_net: Any = None,
) -> Flow:
    emb = make_context(context, context_net)
    stack = coupling_stack(
        shape,
        Additive(),
        num_steps,
        hidden,
        channels,
        num_scales,
        actnorm=False,
        context_features=context_features(emb),
    )
    scaling = ActNorm((math.prod(shape),), data_init=False)
    return build_flow(shape, Compose([stack, scaling]), base, num_levels, logit_alpha, context=emb)


register_family(
    NICE,
    "nice",
    conditional=True,
    title="NICE (Dinh et al., 2015)",
    min_dim=2,
    test=("model.num_steps=2", "model.hidden=[16]", "model.channels=8"),
    smoke={"num_steps": 2, "hidden": [16], "channels": 8},
)
