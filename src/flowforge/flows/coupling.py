"""Coupling layers (NICE, RealNVP, Glow, coupling neural spline flows).

With a binary mask m, the unmasked part passes unchanged and conditions the rest:

    z = m * x + (1 - m) * tau(x; theta(m * x)),   log |det dz/dx| = sum_{i: m_i = 0} log |tau'(x_i)|.

``tau`` is an elementwise map from :mod:`flowforge.flows.elementwise` or :mod:`flowforge.flows.spline`.
Masks: alternating for vectors, checkerboard or channel halves for images.

A conditional coupling's conditioner also reads the context features ``h`` (:mod:`flowforge.flows.context`):

    z = m * x + (1 - m) * tau(x; theta(m * x, h)),

the same log-determinant (the Jacobian is in x, h held fixed).  Vectors: the MLP reads ``[x_kept, h]``.  Images:
``h`` is broadcast over the ``H x W`` grid as extra input channels of the ConvNet, as class-conditional Glow feeds
its label embedding to the coupling networks (Kingma & Dhariwal, 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.base import Transform, sum_except_batch
from flowforge.nn import MLP, ConvNet


def alternating_mask(dim: int, parity: int) -> Tensor:
    """``m_i = 1`` for ``i % 2 == parity``."""
    return (torch.arange(dim) % 2) == parity


def checkerboard_mask(shape: Sequence[int], parity: int) -> Tensor:
    """``m_{c,h,w} = 1`` for ``(h + w) % 2 == parity``."""
    c, h, w = shape
    grid = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == parity
    return grid.expand(c, h, w).clone()


def channel_mask(shape: Sequence[int], parity: int) -> Tensor:
    """The first (parity 0) or second half of the channels is kept."""
    c, h, w = shape
    if c < 2:
        raise ConfigError(f"a channel-mask coupling needs >= 2 channels, got shape {tuple(shape)}")
    keep = torch.arange(c) < c // 2
    if parity:
        keep = ~keep
    return keep[:, None, None].expand(c, h, w).clone()


class VectorConditioner(nn.Module):
    """MLP: the kept coordinates ``(B, D_in)`` -> parameters of the transformed ones ``(B, D_out, P)``; with
    ``context_features`` F > 0 the MLP reads ``cat([x_kept, h])``, ``(B, D_in + F)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_params: int,
        hidden: Sequence[int],
        act: str = "relu",
        context_features: int = 0,
    ):
        super().__init__()
        self.out_features, self.num_params = out_features, num_params
        self.net = MLP(in_features + context_features, hidden, out_features * num_params, act=act)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            x = torch.cat([x, context], dim=1)
        return self.net(x).view(x.shape[0], self.out_features, self.num_params)


class ImageConditioner(nn.Module):
    """ConvNet: ``(B, C_in, H, W)`` -> parameters ``(B, C_out, H, W, P)``; with ``context_features`` F > 0 the
    features ``h`` ``(B, F)`` enter as F more input channels, constant over ``H x W``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_params: int,
        hidden: int,
        act: str = "relu",
        context_features: int = 0,
    ):
        super().__init__()
        self.out_channels, self.num_params = out_channels, num_params
        self.net = ConvNet(in_channels + context_features, hidden, out_channels * num_params, act=act)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        if context is not None:
            x = torch.cat([x, context[:, :, None, None].expand(-1, -1, h, w)], dim=1)
        return self.net(x).view(b, self.out_channels, self.num_params, h, w).permute(0, 1, 3, 4, 2)


Index = slice | Tensor


def _index(positions: Tensor) -> Index:
    """A slice when ``positions`` is an arithmetic progression (a view, no gather), else the positions."""
    n = positions.numel()
    start = int(positions[0])
    step = int(positions[1] - positions[0]) if n > 1 else 1
    if step > 0 and torch.equal(positions, torch.arange(start, start + step * n, step)):
        return slice(start, start + step * (n - 1) + 1, step)
    return positions


def _count(index: Index, n: int) -> int:
    return len(range(n)[index]) if isinstance(index, slice) else index.numel()


def feature_split(mask: Tensor) -> tuple[Index, Index] | None:
    """``(kept, transformed)`` indices along the feature axis (the first axis of ``mask``) when the mask
    is constant over the remaining axes (vector masks, channel masks); ``None`` otherwise (checkerboard)."""
    rows = mask.reshape(mask.shape[0], -1)
    if not bool((rows == rows[:, :1]).all()):
        return None
    keep = rows[:, 0]
    if bool(keep.all()) or not bool(keep.any()):
        raise ConfigError(f"a coupling mask must keep some and transform some features, got {keep.tolist()}")
    return _index(keep.nonzero().squeeze(1)), _index((~keep).nonzero().squeeze(1))


class Coupling(Transform):
    """A coupling layer.  For masks that split the feature axis (vectors, channel halves) the conditioner
    reads only the kept features and returns parameters for the transformed ones only; for checkerboard
    masks it reads the masked input and returns parameters for every position."""

    def __init__(self, mask: Tensor, conditioner: nn.Module, elementwise):
        super().__init__()
        self.register_buffer("mask", mask.bool())
        self.conditioner = conditioner
        self.elementwise = elementwise
        self.split = feature_split(self.mask)
        # Index tensors per device for masks that are not arithmetic progressions.  Deliberately not
        # buffers: EMA / weight averaging (AveragedModel with use_buffers) would average them.
        self._index_cache: dict = {}

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.split = feature_split(self.mask)
        self._index_cache = {}

    def _on(self, index: Index, like: Tensor) -> Index:
        if isinstance(index, slice):
            return index
        key = (index is self.split[0], like.device)
        if key not in self._index_cache:
            self._index_cache[key] = index.to(like.device)
        return self._index_cache[key]

    def _condition(self, kept: Tensor, context: Tensor | None) -> Tensor:
        return self.conditioner(kept) if context is None else self.conditioner(kept, context)

    def _couple(self, x: Tensor, fn, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.split is None:
            y, ladj = fn(x, self._condition(x * self.mask, context))
            return torch.where(self.mask, x, y), sum_except_batch(ladj.masked_fill(self.mask, 0.0))
        keep, free = (self._on(i, x) for i in self.split)
        y, ladj = fn(x[:, free], self._condition(x[:, keep], context))
        if isinstance(free, slice):
            out = torch.slice_scatter(x, y, 1, free.start, free.stop, free.step)
        else:
            out = x.index_copy(1, free, y)
        return out, sum_except_batch(ladj)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, self.elementwise.forward, context)

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, self.elementwise.inverse, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(z, context)[0]


def make_coupling(mask: Tensor, elementwise, hidden, act: str = "relu", context_features: int = 0) -> Coupling:
    """A coupling with an MLP conditioner for 1-D masks or a ConvNet for ``(C, H, W)`` masks.

    ``hidden`` is a list of widths for vectors, or one channel count for images; ``context_features``: the width
    of the context features the conditioner also reads (0: unconditional).
    """
    P = elementwise.num_params
    if mask.dim() == 1 and mask.numel() < 2:
        raise ConfigError("coupling flows need at least 2 dimensions; this dataset has 1")
    split = feature_split(mask)
    n_in, n_out = (mask.shape[0], mask.shape[0]) if split is None else (_count(i, mask.shape[0]) for i in split)
    if mask.dim() == 1:
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        cond = VectorConditioner(n_in, n_out, P, widths, act, context_features)
    else:
        width = hidden if isinstance(hidden, int) else int(list(hidden)[0])
        cond = ImageConditioner(n_in, n_out, P, width, act, context_features)
    return Coupling(mask, cond, elementwise)
