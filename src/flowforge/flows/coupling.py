"""Coupling layers (NICE, RealNVP, Glow, coupling neural spline flows).

With a binary mask m, the unmasked part passes unchanged and conditions the rest:

    z = m * x + (1 - m) * tau(x; theta(m * x)),   log |det dz/dx| = sum_{i: m_i = 0} log |tau'(x_i)|.

``tau`` is an elementwise map from :mod:`flowforge.flows.elementwise` or :mod:`flowforge.flows.spline`.
Masks: alternating for vectors, checkerboard or channel halves for images.
"""

from __future__ import annotations

from typing import Sequence

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
    """MLP: masked vector ``(B, D)`` -> parameters ``(B, D, P)``."""

    def __init__(self, dim: int, num_params: int, hidden: Sequence[int], act: str = "relu"):
        super().__init__()
        self.dim, self.num_params = dim, num_params
        self.net = MLP(dim, hidden, dim * num_params, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).view(x.shape[0], self.dim, self.num_params)


class ImageConditioner(nn.Module):
    """ConvNet: masked image ``(B, C, H, W)`` -> parameters ``(B, C, H, W, P)``."""

    def __init__(self, channels: int, num_params: int, hidden: int, act: str = "relu"):
        super().__init__()
        self.num_params = num_params
        self.net = ConvNet(channels, hidden, channels * num_params, act=act)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return self.net(x).view(b, c, self.num_params, h, w).permute(0, 1, 3, 4, 2)


class Coupling(Transform):
    def __init__(self, mask: Tensor, conditioner: nn.Module, elementwise):
        super().__init__()
        self.register_buffer("mask", mask.bool())
        self.conditioner = conditioner
        self.elementwise = elementwise
        # Derived from ``mask`` per (device, dtype).  Deliberately not buffers: EMA / weight averaging
        # (AveragedModel with use_buffers) would average them, and an averaged index buffer truncates.
        self._free_cache: dict = {}

    def _load_from_state_dict(self, *args, **kwargs):
        self._free_cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _free(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Indices and float mask of the transformed (mask == 0) coordinates of a vector coupling."""
        key = (like.device, like.dtype)
        if key not in self._free_cache:
            free = ~self.mask.to(like.device)
            self._free_cache[key] = (free.nonzero().squeeze(1), free.to(like.dtype))
        return self._free_cache[key]

    def _params(self, x: Tensor) -> Tensor:
        return self.conditioner(x * self.mask)

    def _couple(self, x: Tensor, fn) -> tuple[Tensor, Tensor]:
        p = self._params(x)
        if x.dim() != 2:
            y, ladj = fn(x, p)
            return torch.where(self.mask, x, y), sum_except_batch(ladj.masked_fill(self.mask, 0.0))
        idx, free = self._free(x)
        if self.elementwise.num_params > 2:
            # Expensive elementwise maps (splines): run them on the transformed coordinates only instead of
            # on all D and discarding half (for affine maps the two index ops cost more than they save).
            y, ladj = fn(x.index_select(1, idx), p.index_select(1, idx))
            return x.index_copy(1, idx, y), ladj.sum(1)
        y, ladj = fn(x, p)
        return torch.where(self.mask, x, y), ladj @ free  # masked row sum in one op (vs masked_fill + sum)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, self.elementwise.forward)

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(z, self.elementwise.inverse)

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_and_log_det(z)[0]


def make_coupling(mask: Tensor, elementwise, hidden, act: str = "relu") -> Coupling:
    """A coupling with an MLP conditioner for 1-D masks or a ConvNet for ``(C, H, W)`` masks.

    ``hidden`` is a list of widths for vectors, or one channel count for images.
    """
    P = elementwise.num_params
    if mask.dim() == 1:
        if mask.numel() < 2:
            raise ConfigError("coupling flows need at least 2 dimensions; this dataset has 1")
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        cond = VectorConditioner(mask.numel(), P, widths, act)
    else:
        width = hidden if isinstance(hidden, int) else int(list(hidden)[0])
        cond = ImageConditioner(mask.shape[0], P, width, act)
    return Coupling(mask, cond, elementwise)
