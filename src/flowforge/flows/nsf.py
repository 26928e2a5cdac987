"""Neural spline flows (Durkan et al., 2019): rational-quadratic spline couplings with an LU-parametrised
linear map before each (and ActNorm on images; Glow layout for images) or, with ``autoregressive``, MADE
layers driving the spline (RQ-NSF (AR)).  ``actnorm`` and ``lu_init`` left at ``None`` take the
defaults of :func:`flowforge.flows.architectures.vector_defaults`.  See :mod:`flowforge.flows.spline`
for the spline itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowforge.flows.architectures import coupling_stack
from flowforge.flows.context import context_features, make_context
from flowforge.flows.maf import autoregressive_layers
from flowforge.flows.model import Flow, build_flow
from flowforge.flows.registry import register_family
from flowforge.flows.spline import RationalQuadraticSpline


def NSF(
    shape: Sequence[int],
    num_steps: int = 4,
    hidden: Sequence[int] = (64, 64),
    channels: int = 64,
    num_scales: int = 2,
    bins: int = 8,
    bound: float = 5.0,
    autoregressive: bool = False,
    actnorm: bool | None = None,
    lu_init: str | None = None,
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    context: Any = None,
    context_net: Any = None,
) -> Flow:
    emb = make_context(context, context_net)
    features = context_features(emb)

    def spline() -> RationalQuadraticSpline:
        return RationalQuadraticSpline(bins=bins, bound=bound)

    if autoregressive:
        stack = autoregressive_layers(shape, spline, num_steps, hidden, inverse=False, context_features=features)
    else:
        stack = coupling_stack(
            shape,
            spline(),
            num_steps,
            hidden,
            channels,
            num_scales,
            actnorm,
            lu=True,
            layout="glow",
            lu_init=lu_init,
            context_features=features,
        )
    return build_flow(shape, stack, base, num_levels, logit_alpha, context=emb)


register_family(
    NSF,
    "nsf",
    conditional=True,
    title="Neural spline flow, coupling or autoregressive (Durkan et al., 2019)",
    min_dim=2,
    test=("model.num_steps=2", "model.hidden=[16]", "model.channels=8", "model.bins=4"),
    smoke={"num_steps": 2, "hidden": [16], "channels": 8, "bins": 4},
)
