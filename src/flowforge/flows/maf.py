"""MAF and IAF (Papamakarios et al., 2017; Kingma et al., 2016).

MAF: ``z_i = (x_i - mu_i(x_{<i})) exp(-alpha_i(x_{<i}))`` written as ``x_i exp(s_i) + t_i`` with
``log |det dz/dx| = sum_i s_i``; density in one MADE pass, sampling in D passes.  Successive layers
reverse the variable order.  IAF is the inverse of the same layer: sampling in one pass, density in D.
Images are flattened to vectors first.  A conditional model's MADEs also read the context features
(:mod:`flowforge.flows.autoregressive`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flowforge.errors import ConfigError
from flowforge.flows.autoregressive import MaskedAutoregressive
from flowforge.flows.base import Inverse, Transform
from flowforge.flows.context import context_features, make_context
from flowforge.flows.elementwise import Affine
from flowforge.flows.model import Flow, build_flow, flatten_images
from flowforge.flows.registry import register_family


def autoregressive_layers(
    shape: Sequence[int],
    make_elementwise,
    num_layers: int,
    hidden: Sequence[int],
    inverse: bool,
    context_features: int = 0,
    act: str = "relu",
) -> Transform:
    """``num_layers`` MADE layers (hidden units ``act``) with alternating (identity, reversed) orders, optionally
    inverted; each reads ``context_features`` context features (0: unconditional)."""
    dim = math.prod(shape)
    layers = []
    for i in range(num_layers):
        order = list(range(dim)) if i % 2 == 0 else list(reversed(range(dim)))
        layer = MaskedAutoregressive(
            dim, make_elementwise(), hidden, order=order, act=act, context_features=context_features
        )
        layers.append(Inverse(layer) if inverse else layer)
    return flatten_images(shape, layers)


def MAF(
    shape: Sequence[int],
    num_layers: int = 5,
    hidden: Sequence[int] = (64, 64),
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    inverse: bool = False,
    context: Any = None,
    context_net: Any = None,
    act: str = "relu",
) -> Flow:
    """Model config ``maf`` (module docstring); ``act``: the MADE's hidden activation (relu, or tanh as sbi's MAF)."""
    emb = make_context(context, context_net)
    stack = autoregressive_layers(
        shape, lambda: Affine("tanh"), num_layers, hidden, inverse, context_features(emb), act=act
    )
    return build_flow(shape, stack, base, num_levels, logit_alpha, context=emb)


def IAF(shape: Sequence[int], max_density_passes: int = 1024, **kwargs) -> Flow:
    """Model config ``iaf``: MAF layers inverted (fast sampling, exact but D-pass density).

    Maximum-likelihood training evaluates densities, which costs IAF ``D`` sequential passes per
    layer, so data with more than ``max_density_passes`` dimensions are refused.
    """
    dim = math.prod(shape)
    if dim > max_density_passes:
        raise ConfigError(
            f"iaf evaluates a density in D sequential passes per layer; this dataset has D={dim} "
            f"(> model.max_density_passes={max_density_passes}), too slow for likelihood training: use maf"
        )
    return MAF(shape, inverse=True, **kwargs)


register_family(
    MAF,
    "maf",
    conditional=True,
    title="MAF (Papamakarios et al., 2017)",
    test=("model.num_layers=2", "model.hidden=[16]"),
    smoke={"num_layers": 2, "hidden": [16]},
)
register_family(
    IAF,
    "iaf",
    conditional=True,
    title="IAF (Kingma et al., 2016)",
    max_dim_option="max_density_passes",
    test=("model.num_layers=2", "model.hidden=[16]", "model.max_density_passes=64"),
    smoke={"num_layers": 2, "hidden": [16]},
)
