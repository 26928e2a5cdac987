"""Elementwise monotone maps ``y_i = tau(x_i; theta_i)`` whose parameters come from a conditioner.

Couplings and autoregressive layers share these (a neural spline flow is a MAF or a coupling with
another elementwise map).  Parameters arrive with shape ``(*x.shape, num_params)``; ``forward`` and
``inverse`` return the output and the elementwise ``log |dy/dx|`` (resp. ``log |dx/dy|``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowforge.errors import ConfigError


class Additive:
    """NICE: ``y = x + t``, log-det 0."""

    num_params = 1

    def forward(self, x: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        return x + p[..., 0], torch.zeros_like(x)

    def inverse(self, y: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        return y - p[..., 0], torch.zeros_like(y)


class Affine:
    """RealNVP / Glow / MAF: ``y = x exp(s) + t`` with ``log |dy/dx| = s``.

    ``scale`` maps the raw output r to s: ``exp`` (s = r), ``tanh`` (s = c tanh(r / c), a soft clamp at
    +-c = ``max_log_scale``) or ``sigmoid`` (Glow: exp(s) = sigmoid(r + 2)).
    """

    num_params = 2

    def __init__(self, scale: str = "tanh", max_log_scale: float = 3.0):
        if scale not in ("exp", "tanh", "sigmoid"):
            raise ConfigError(f"unknown affine scale '{scale}'; choose exp, tanh or sigmoid")
        self.scale, self.c = scale, max_log_scale

    def log_scale(self, r: Tensor) -> Tensor:
        if self.scale == "tanh":
            return self.c * torch.tanh(r / self.c)
        if self.scale == "sigmoid":
            # log(sigmoid) rather than F.logsigmoid: the same value wherever sigmoid(r + 2) is a normal float
            # (r > -85 in float32; below that the scale itself underflows), and on CPU about 10x faster, as
            # both ops are vectorised where logsigmoid is not
            return torch.log(torch.sigmoid(r + 2.0))
        return r

    # ``unbind`` costs one autograd node (its backward is one stack) where two ``p[..., i]`` selects cost
    # two SelectBackward nodes, each allocating and filling a zero tensor of p's shape; ``addcmul`` fuses
    # the scale and the shift into one op / one backward node.
    def forward(self, x: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        t, r = p.unbind(-1)
        s = self.log_scale(r)
        return torch.addcmul(t, x, torch.exp(s)), s

    def inverse(self, y: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        t, r = p.unbind(-1)
        s = self.log_scale(r)
        return (y - t) * torch.exp(-s), -s
