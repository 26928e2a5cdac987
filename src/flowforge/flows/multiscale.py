"""Multiscale image architecture (Dinh et al., RealNVP, 2017): squeeze and factor-out.

Squeeze: ``(C, H, W) -> (4C, H/2, W/2)``, each 2x2 patch moved to channels (log-det 0).
Factor-out: after a scale, half the channels go straight to the base distribution and the rest go
on through the next scale; the output is the flat concatenation ``[z_out, z_rest]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flowforge.errors import ConfigError
from flowforge.flows.base import Compose, Transform


class Squeeze(Transform):
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        z = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return z, x.new_zeros(b)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = z.shape
        return z.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


class Reshape(Transform):
    """``(B, *in_shape) -> (B, *out_shape)``; log-det 0."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], *self.out_shape), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return z.reshape(z.shape[0], *self.in_shape)


class FactorOut(Transform):
    """Keeps the first half of the channels of a ``(C, H, W)`` input and sends the rest through
    ``inner`` (which must return a flat tensor); returns ``cat(flat(x_kept), inner(x_rest))``."""

    def __init__(self, inner: Transform, shape: Sequence[int]):
        super().__init__()
        c, h, w = shape
        self.inner = inner
        self.kept_shape = (c // 2, h, w)
        self.rest_shape = (c - c // 2, h, w)
        self.n_kept = math.prod(self.kept_shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, rest = x[:, : self.kept_shape[0]], x[:, self.kept_shape[0] :]
        z_rest, log_det = self.inner(rest) if context is None else self.inner(rest, context)
        return _cat(kept.reshape(x.shape[0], -1), z_rest), log_det

    def _split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z[:, : self.n_kept].reshape(z.shape[0], *self.kept_shape), z[:, self.n_kept :]

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        kept, z_rest = self._split(z)
        return _cat(
            kept, (self.inner.inverse(z_rest) if context is None else self.inner.inverse(z_rest, context)), dim=1
        )

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, z_rest = self._split(z)
        rest, log_det = (
            self.inner.inverse_and_log_det(z_rest)
            if context is None
            else self.inner.inverse_and_log_det(z_rest, context)
        )
        return _cat(kept, rest, dim=1), log_det


def _cat(a: Tensor, b: Tensor, dim: int = 1) -> Tensor:
    return torch.cat([a, b], dim=dim)


def multiscale(
    shape: Sequence[int],
    num_scales: int,
    make_scale: Callable[[tuple, bool], tuple[list, tuple]],
) -> Transform:
    """Build the multiscale stack.  ``make_scale(shape, is_last)`` returns the transforms of one
    scale and the shape they output; all but the last scale factor out half of their channels."""
    shape = tuple(shape)
    if num_scales < 1:
        raise ConfigError(f"num_scales must be >= 1, got {num_scales}")
    layers, out_shape = make_scale(shape, num_scales == 1)
    if num_scales == 1:
        return Compose(layers + [Reshape(out_shape, (math.prod(out_shape),))])
    c, h, w = out_shape
    if c < 2:
        raise ConfigError(f"cannot factor out half of {c} channel(s) at shape {out_shape}; use fewer scales")
    inner = multiscale((c - c // 2, h, w), num_scales - 1, make_scale)
    return Compose(layers + [FactorOut(inner, out_shape)])


def check_squeezable(shape: Sequence[int], times: int, family: str) -> None:
    """Raise a clear error when H and W cannot be halved ``times`` times."""
    _, h, w = shape
    f = 2**times
    if h % f or w % f:
        raise ConfigError(
            f"{family}: image size {h}x{w} cannot be squeezed {times} time(s) (needs multiples of {f}); "
            f"reduce model.num_scales"
        )
