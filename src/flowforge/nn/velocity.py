"""Time-conditioned velocity networks ``v(x, t)`` for continuous normalizing flows.

A CNF integrates ``dx/dt = v(x, t)``; the network sees the time ``t`` at every layer (FFJORD's
"concat" layers, Grathwohl et al., 2019): each layer maps ``[h_l, t] -> h_{l+1}``,

    h_{l+1} = a(W_l [h_l; t] + b_l)      (the last layer has no activation),

so the vector field can change over time.  For images the time enters as one extra constant input
channel of every convolution.  We chose plain concatenation over ConcatSquash (which also gates each
layer's output by ``sigmoid(a t + c)``) because it is the layer FFJORD's image models use and it keeps
the network a plain stack of affine maps.

Both networks take ``forward(t, x)`` with ``t`` a scalar tensor (the same time for the batch) or a
per-sample ``(B,)`` tensor (flow matching trains with one time per sample).  Weights use PyTorch's default
(random) initialisation, including the last layer: a zero last layer would make the initial ODE the
identity map, which would hide errors in tests of log-determinants and adjoints.

A conditional CNF's velocity ``v(x, t, h)`` also reads the context features ``h`` (``(B, F)``,
``context_features = F > 0``), concatenated to the input of the MLP's first layer, ``a(W_0 [x; t; h] + b_0)``,
or, for images, broadcast over the pixels as ``F`` extra constant input channels of the first convolution.
Without a context (``context_features = 0``) the networks are exactly the unconditional ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError

ACTIVATIONS = {"softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "swish": nn.SiLU}


def velocity_activation(name: str) -> nn.Module:
    """The activation ``name`` (softplus, FFJORD's default; tanh; elu; swish = x sigmoid(x))."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown CNF activation '{name}'; choose one of {sorted(ACTIVATIONS)} (model.act)") from None


def time_column(t: Tensor, x: Tensor) -> Tensor:
    """``t`` as a ``(B, 1)`` column matching ``x``'s batch, dtype and device (scalar or ``(B,)`` input)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0], 1)
    if t.shape != (x.shape[0],):
        raise ConfigError(
            f"the time must be a scalar or one value per sample {(x.shape[0],)}, got shape {tuple(t.shape)}"
        )
    return t.reshape(-1, 1)


def _check_sizes(name: str, sizes: Sequence[int]) -> list[int]:
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes):
        raise ConfigError(f"{name} must be positive integers, got {sizes}")
    return sizes


class VelocityMLP(nn.Module):
    """``v(x, t)`` on flat vectors ``(B, dim)``: ``dim -> hidden... -> dim`` with ``t`` concatenated to
    the input of every linear layer, and the context features (``context_features > 0``) to the first."""

    def __init__(
        self, dim: int, hidden: Sequence[int] = (64, 64, 64), act: str = "softplus", context_features: int = 0
    ):
        super().__init__()
        if int(dim) < 1:
            raise ConfigError(f"the velocity network needs dim >= 1, got {dim}")
        self.dim = int(dim)
        self.context_features = int(context_features)
        sizes = [self.dim, *_check_sizes("model.hidden", hidden), self.dim]
        widths = [a + 1 + (self.context_features if i == 0 else 0) for i, a in enumerate(sizes[:-1])]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, sizes[1:]))
        self.acts = nn.ModuleList(velocity_activation(act) for _ in sizes[1:-1])

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        tc = time_column(t, x)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(torch.cat([h, tc] if i or context is None else [h, tc, context], dim=1))
            if i < len(self.acts):
                h = self.acts[i](h)
        return h


class VelocityConvNet(nn.Module):
    """``v(x, t)`` on images ``(B, C, H, W)``: one convolution per entry of ``kernels`` (odd sizes, 'same'
    padding), ``channels_in -> hidden_channels... -> channels_in``, each convolution reading the time as an
    extra constant input channel (and the first one the context features, ``context_features > 0``, as constant
    channels).  ``hidden_channels`` is one width for every hidden layer or a list of ``len(kernels) - 1`` widths."""

    def __init__(
        self,
        channels_in: int,
        hidden_channels: int | Sequence[int] = 64,
        kernels: Sequence[int] = (3, 3, 3),
        act: str = "softplus",
        context_features: int = 0,
    ):
        super().__init__()
        kernels = _check_sizes("model.kernels", kernels)
        if not kernels or any(k % 2 == 0 for k in kernels):
            raise ConfigError(f"model.kernels must list odd kernel sizes (one per convolution), got {kernels}")
        if isinstance(hidden_channels, int):
            hidden = [hidden_channels] * (len(kernels) - 1)
        else:
            hidden = list(hidden_channels)
        hidden = _check_sizes("model.channels", hidden)
        if len(hidden) != len(kernels) - 1:
            raise ConfigError(
                f"{len(kernels)} kernels need {len(kernels) - 1} hidden widths, got {hidden}: give one width "
                f"(model.channels) or one per hidden layer"
            )
        self.channels_in = int(channels_in)
        self.context_features = int(context_features)
        sizes = [self.channels_in, *hidden, self.channels_in]
        widths = [a + 1 + (self.context_features if i == 0 else 0) for i, a in enumerate(sizes[:-1])]
        self.layers = nn.ModuleList(nn.Conv2d(a, b, k, padding=k // 2) for a, b, k in zip(widths, sizes[1:], kernels))
        self.acts = nn.ModuleList(velocity_activation(act) for _ in hidden)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        tmap = time_column(t, x).reshape(b, 1, 1, 1).expand(b, 1, h, w)
        out = x
        for i, layer in enumerate(self.layers):
            if i or context is None:
                out = layer(torch.cat([out, tmap], dim=1))
            else:
                cmap = context.reshape(b, -1, 1, 1).expand(b, context.shape[1], h, w)
                out = layer(torch.cat([out, tmap, cmap], dim=1))
            if i < len(self.acts):
                out = self.acts[i](out)
        return out
