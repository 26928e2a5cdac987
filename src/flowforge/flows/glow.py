"""Glow (Kingma & Dhariwal, 2018): steps of ActNorm -> invertible 1x1 convolution (LU form) ->
affine coupling with ``exp(s) = sigmoid(h + 2)``; for images each scale starts with a squeeze and
ends with a factor-out.  On vectors the 1x1 convolution is a full LU-parametrised linear map, started
at the identity (``lu_init``; images start from a random rotation as in the paper)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowforge.flows.architectures import coupling_stack
from flowforge.flows.context import context_features, make_context
from flowforge.flows.elementwise import Affine
from flowforge.flows.model import Flow, build_flow
from flowforge.flows.registry import register_family


def Glow(
    shape: Sequence[int],
    num_steps: int = 4,
    hidden: Sequence[int] = (64, 64),
    channels: int = 64,
    num_scales: int = 2,
    lu_init: str | None = None,
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    context: Any = None,
    context_net: Any = None,
) -> Flow:
    emb = make_context(context, context_net)
    stack = coupling_stack(
        shape,
        Affine("sigmoid"),
        num_steps,
        hidden,
        channels,
        num_scales,
        actnorm=True,
        lu=True,
        layout="glow",
        lu_init=lu_init,
        context_features=context_features(emb),
    )
    return build_flow(shape, stack, base, num_levels, logit_alpha, context=emb)


register_family(
    Glow,
    "glow",
    conditional=True,
    title="Glow (Kingma & Dhariwal, 2018)",
    min_dim=2,
    test=("model.num_steps=2", "model.hidden=[16]", "model.channels=8"),
    smoke={"num_steps": 2, "hidden": [16], "channels": 8, "num_scales": 2},
)
