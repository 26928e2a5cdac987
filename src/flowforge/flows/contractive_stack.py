"""The architecture shared by residual, implicit and monotone flows: blocks built around contractive g.

- Vectors (2-D toys, tabular, 1-D): ``[ActNorm ->] [block [-> ActNorm]] x num_blocks``.
- Images (Residual Flows, Sec. 5; i-DenseNets; Monotone Flows): logit -> [squeeze ->] ActNorm -> per
  scale ``[block -> ActNorm] x n``; a squeeze between scales (with ``factor_out``, half the channels
  leave after each of these squeezes); after the last scale ``fc_blocks`` fully connected blocks on the
  flattened tensor, each followed by ActNorm.

The arrangement is a :class:`flowforge.flows.options.Stack`; ``make_block(kind, shape, first)`` builds
one block for ``kind`` in ``vector | image | fc`` on inputs of ``shape`` (``first``: the network's first
image block).  ActNorm uses Residual Flows' variance floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from flowforge.errors import ConfigError
from flowforge.flows.actnorm import ActNorm
from flowforge.flows.base import Compose, Transform
from flowforge.flows.context import ContextEmbedding
from flowforge.flows.model import Flow, build_flow
from flowforge.flows.multiscale import FactorOut, Reshape, Squeeze
from flowforge.flows.options import Stack

#: test-suite overrides giving a small contractive model (two vector blocks of width 8, one conv block of 4
#: channels and one FC block on images): the family registry's ``test`` sizes of resflow, iresnet and impflow
TEST_SIZES = (
    "model.num_blocks=2",
    "model.hidden=[8]",
    "model.blocks_per_scale=[1]",
    "model.channels=4",
    "model.fc_blocks=1",
    "model.fc_hidden=[8]",
)
#: overrides for the brute-force Jacobian tests of families solving in the forward pass (impflow, monotone): the
#: exact log-det and every solve (forward, inverse, adjoint) to 1e-13
TIGHT_SOLVES_EXACT = (
    "estimator=exact",
    *(f"model.{s}_solver.{t}=1e-13" for s in ("forward", "inverse", "backward") for t in ("atol", "rtol")),
    "model.backward_solver.max_iters=1000",
)

# ActNorm's variance floor in Residual Flows' data-dependent init: s = -1/2 log(max(var, 0.2))
RESFLOW_ACTNORM_MIN_VAR = 0.2

MakeBlock = Callable[[str, tuple, bool], Transform]


def max_scales(h: int, w: int) -> int:
    """Scales an H x W image supports when each scale halves it (down to at least 4 x 4 at the last)."""
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return n


def contractive_stack(
    shape: Sequence[int],
    make_block: MakeBlock,
    stack: Stack = Stack(),
    *,
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    context: ContextEmbedding | None = None,
) -> Flow:
    """The flow on data of ``shape``: blocks from ``make_block`` arranged as ``stack`` says, and the base
    distribution and image preprocessing of :func:`flowforge.flows.model.build_flow`; ``context``: the
    embedding of a conditional model (its blocks' g read the context features)."""
    shape = tuple(int(s) for s in shape)
    actnorm, fc_blocks, factor_out = stack.actnorm, stack.fc_blocks, stack.factor_out

    def an(s: Sequence[int]) -> ActNorm:
        return ActNorm(s, min_var=RESFLOW_ACTNORM_MIN_VAR)

    if len(shape) == 1:
        if stack.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {stack.num_blocks}")
        layers: list[Transform] = [an(shape)] if actnorm else []
        for _ in range(stack.num_blocks):
            layers.append(make_block("vector", shape, False))
            if actnorm:
                layers.append(an(shape))
        return build_flow(
            shape, Compose(layers), base=base, num_levels=num_levels, logit_alpha=logit_alpha, context=context
        )
    if len(shape) != 3:
        raise ConfigError(f"these flows take vectors (D,) or images (C, H, W); got shape {shape}")

    layers = []
    c, h, w = shape
    if stack.squeeze_first:
        if h % 2 or w % 2:
            raise ConfigError(f"squeeze_first needs even image sizes, got {h}x{w}")
        layers.append(Squeeze())
        c, h, w = 4 * c, h // 2, w // 2
    blocks_per_scale = [int(b) for b in stack.blocks_per_scale]
    n_scales = len(blocks_per_scale)
    if n_scales < 1 or min(blocks_per_scale) < 1:
        raise ConfigError(f"blocks_per_scale must list >= 1 blocks per scale, got {blocks_per_scale}")
    if n_scales > max_scales(h, w):
        raise ConfigError(
            f"{n_scales} scales need an image of at least {4 * 2 ** (n_scales - 1)}x{4 * 2 ** (n_scales - 1)} "
            f"(after squeeze_first); this one is {h}x{w}: shorten model.blocks_per_scale"
        )
    if factor_out and any(s % 2 ** (n_scales - 1) for s in (h, w)):
        raise ConfigError(f"factor_out needs image sizes divisible by {2 ** (n_scales - 1)}, got {h}x{w}")

    def scale(s: tuple, index: int) -> list[Transform]:
        out: list[Transform] = []
        if index == 0 and actnorm:
            out.append(an(s))
        for i in range(blocks_per_scale[index]):
            out.append(make_block("image", s, index == 0 and i == 0))
            if actnorm:
                out.append(an(s))
        return out

    def fc_end(s: tuple) -> list[Transform]:
        d = math.prod(s)
        out: list[Transform] = [Reshape(s, (d,))]
        for _ in range(fc_blocks):
            out.append(make_block("fc", (d,), False))
            if actnorm:
                out.append(an((d,)))
        return out

    def build_scales(s: tuple, index: int) -> list[Transform]:
        """Scales ``index..`` on an input of shape ``s``; the result ends flat."""
        out = scale(s, index)
        if index == n_scales - 1:
            return out + (fc_end(s) if fc_blocks > 0 else [Reshape(s, (math.prod(s),))])
        out.append(Squeeze())
        s = (4 * s[0], s[1] // 2, s[2] // 2)
        if factor_out:
            inner = Compose(build_scales((s[0] - s[0] // 2, s[1], s[2]), index + 1))
            return out + [FactorOut(inner, s)]
        return out + build_scales(s, index + 1)

    layers += build_scales((c, h, w), 0)
    return build_flow(
        shape, Compose(layers), base=base, num_levels=num_levels, logit_alpha=logit_alpha, context=context
    )
