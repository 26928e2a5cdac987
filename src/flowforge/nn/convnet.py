"""Convolutional conditioner for image couplings (RealNVP/Glow style).

``3x3 conv -> act -> 1x1 conv -> act -> 3x3 conv`` with same padding; the last convolution starts
at zero so the coupling it drives starts as the identity.
"""

from __future__ import annotations

from torch import nn

from flowforge.nn.mlp import activation


class ConvNet(nn.Sequential):
    def __init__(self, in_channels: int, hidden: int, out_channels: int, act: str = "relu", zero_last: bool = True):
        last = nn.Conv2d(hidden, out_channels, 3, padding=1)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            activation(act, inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            activation(act, inplace=True),
            last,
        )
