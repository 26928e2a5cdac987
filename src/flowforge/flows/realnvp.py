"""RealNVP (Dinh et al., 2017): affine couplings ``z_2 = x_2 exp(s(x_1)) + t(x_1)`` with
``log |det| = sum s(x_1)``; checkerboard and channel masks in a multiscale architecture for images,
alternating masks for vectors.  ActNorm replaces the paper's batch normalisation; left at ``None`` it is
used on images only (:func:`flowforge.flows.architectures.vector_defaults`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowforge.flows.architectures import coupling_stack
from flowforge.flows.context import context_features, make_context
from flowforge.flows.elementwise import Affine
from flowforge.flows.model import Flow, build_flow
from flowforge.flows.registry import register_family


def RealNVP(
    shape: Sequence[int],
    num_steps: int = 4,
    hidden: Sequence[int] = (64, 64),
    channels: int = 64,
    num_scales: int = 2,
    actnorm: bool | None = None,
    scale: str = "tanh",
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    context: Any = None,
    context_net: Any = None,
) -> Flow:
    emb = make_context(context, context_net)
    stack = coupling_stack(
        shape,
        Affine(scale),
        num_steps,
        hidden,
        channels,
        num_scales,
        actnorm=actnorm,
        context_features=context_features(emb),
    )
    return build_flow(shape, stack, base, num_levels, logit_alpha, context=emb)


register_family(
    RealNVP,
    "realnvp",
    conditional=True,
    title="RealNVP (Dinh et al., 2017)",
    min_dim=2,
    test=("model.num_steps=2", "model.hidden=[16]", "model.channels=8"),
    smoke={"num_steps": 2, "hidden": [16], "channels": 8, "num_scales": 2},
)
