"""Residual Flows (Chen et al., 2019) and i-ResNets (Behrmann et al., 2019).

A stack of invertible residual blocks ``y = x + g(x)`` (Lip(g) <= coeff < 1), optionally each
followed by ActNorm, with log-det by the chosen estimator (``estimator`` config group).

- Vectors (2-D toys, tabular): ``[ActNorm ->] [ResBlock(MLP g) [-> ActNorm]] x num_blocks``; the last
  layer of each g starts at zero so every block starts as the identity.
- Images (Residual Flows, Sec. 5): logit -> [squeeze ->] ActNorm -> per scale
  ``[ResBlock(conv g) -> ActNorm] x n`` with g = ``[act ->] conv3x3 -> act -> conv1x1 -> act -> conv3x3``
  (hidden width ``channels``, pre-activation, the network's first block without the leading
  activation); a squeeze between scales (and, with ``factor_out``, half the channels leave after each of
  these squeezes; ``squeeze_first`` adds one squeeze before the first scale); after the last scale ``fc_blocks`` fully connected blocks of width
  ``fc_hidden`` on the flattened tensor, each followed by ActNorm.
- :func:`IResNet`: the same skeleton with i-ResNet's choices (ELU, coeff 0.9, truncated series).
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

from torch import nn

from flowforge.errors import ConfigError
from flowforge.estimators.exact import MAX_EXACT_DIM
from flowforge.estimators.logdet import LogDetEstimator
from flowforge.flows.actnorm import ActNorm
from flowforge.flows.base import Compose, Transform
from flowforge.flows.model import Flow, build_flow
from flowforge.flows.multiscale import FactorOut, Reshape, Squeeze
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.lipschitz_net import lipschitz_convnet, lipschitz_mlp

log = logging.getLogger("flowforge")

# ActNorm's variance floor in Residual Flows' data-dependent init: s = -1/2 log(max(var, 0.2))
RESFLOW_ACTNORM_MIN_VAR = 0.2


def _as_estimator(estimator: Union[None, dict, LogDetEstimator], dim: int) -> LogDetEstimator:
    """The block estimator from its config; ``name: auto`` resolves to ``exact`` for inputs of at most
    ``auto_exact_max_dim`` dimensions and to ``roulette`` (with the configured gradient options) otherwise."""
    if estimator is None:
        estimator = {"name": "auto"}
    if isinstance(estimator, LogDetEstimator):
        return estimator
    kwargs = {k: v for k, v in dict(estimator).items() if not str(k).startswith("_")}
    max_exact = kwargs.pop("auto_exact_max_dim", 2)
    if kwargs.get("name", "roulette") == "auto":
        kwargs["name"] = "exact" if dim <= max_exact else "roulette"
        if kwargs["name"] == "exact":
            kwargs.update(neumann_grad=False, mem_eff=False)
        log.info("estimator=auto resolved to %s for %d-dimensional data", kwargs["name"], dim)
    if kwargs.get("name") == "exact" and dim > MAX_EXACT_DIM:
        raise ConfigError(
            f"estimator=exact needs {dim} Jacobian-vector products per block for {dim}-dimensional data "
            f"(limit {MAX_EXACT_DIM}); use estimator=roulette, neumann_grad, mem_eff or power_series"
        )
    return LogDetEstimator(**kwargs)


def max_scales(h: int, w: int) -> int:
    """Scales an H x W image supports when each scale halves it (down to at least 4 x 4 at the last)."""
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return n


def ResidualFlow(
    shape: Sequence[int],
    estimator: Union[None, dict, LogDetEstimator] = None,
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
    num_levels: Optional[int] = None,
    logit_alpha: Optional[float] = None,
) -> Flow:
    shape = tuple(int(s) for s in shape)
    est = _as_estimator(estimator, math.prod(shape))
    lip = dict(act=act, coeff=coeff, norm=norm, learn_p=learn_p, sn_rtol=sn_rtol, sn_max_iters=sn_max_iters)
    inv = dict(inverse_atol=inverse_atol, inverse_rtol=inverse_rtol, inverse_max_iters=inverse_max_iters,
               on_fail=on_fail)

    def block(g: nn.Module) -> ResidualBlock:
        return ResidualBlock(g, est, **inv)

    def an(s: Sequence[int]) -> ActNorm:
        return ActNorm(s, min_var=RESFLOW_ACTNORM_MIN_VAR)

    if len(shape) == 1:
        if num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
        d = shape[0]
        layers: list[Transform] = [an(shape)] if actnorm else []
        for _ in range(num_blocks):
            layers.append(block(lipschitz_mlp(d, hidden, preact=False, zero_last=True, **lip)))
            if actnorm:
                layers.append(an(shape))
        return build_flow(shape, Compose(layers), base, num_levels, logit_alpha)
    if len(shape) != 3:
        raise ConfigError(f"residual flows take vectors (D,) or images (C, H, W); got shape {shape}")

    layers = []
    c, h, w = shape
    if squeeze_first:
        if h % 2 or w % 2:
            raise ConfigError(f"squeeze_first needs even image sizes, got {h}x{w}")
        layers.append(Squeeze())
        c, h, w = 4 * c, h // 2, w // 2
    blocks_per_scale = [int(b) for b in blocks_per_scale]
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
            first = index == 0 and i == 0
            g = lipschitz_convnet(s, channels, kernels, preact=preact and not first, **lip)
            out.append(block(g))
            if actnorm:
                out.append(an(s))
        return out

    def fc_end(s: tuple) -> list[Transform]:
        d = math.prod(s)
        out: list[Transform] = [Reshape(s, (d,))]
        for _ in range(fc_blocks):
            out.append(block(lipschitz_mlp(d, fc_hidden, preact=preact, zero_last=False, **lip)))
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
    return build_flow(shape, Compose(layers), base, num_levels, logit_alpha)


def IResNet(
    shape: Sequence[int],
    estimator: Union[None, dict, LogDetEstimator] = None,
    act: str = "elu",
    coeff: float = 0.9,
    **kwargs,
) -> Flow:
    """i-ResNet: a residual flow with ELU, coeff 0.9 and (by its config) the truncated power series."""
    return ResidualFlow(shape, estimator=estimator, act=act, coeff=coeff, **kwargs)
