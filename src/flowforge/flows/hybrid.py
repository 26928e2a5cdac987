"""Hybrid modelling (Residual Flows, Chen et al., 2019, Sec. 6): a flow as a feature extractor.

One forward pass of the flow ``f`` gives both ``log p(x) = log p_Z(f(x)) + log |det df/dx|`` and
features for a classifier.  Images: at the end of every scale (the tensor entering each ``Squeeze``
between scales, and the tensor entering the final flat ``Reshape``) a head

    h_s = mean_{H,W} ReLU(ActNorm(Conv3x3(x_s)))          (head_channels features per scale)

and ``logits = Linear(cat(h_1, ..., h_S))``.  Vector data: ``logits = Linear(ReLU(Linear(z)))`` on the
final ``z = f(x)``.  The hybrid loss per example is

    L(x, y) = lam * (-log p(x)) + CrossEntropy(logits(x), y),      lam in {0, 1/D, 1},

with ``D`` the data dimension; ``lam = 0`` is pure classification by an invertible network.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.actnorm import ActNorm
from flowforge.flows.base import Compose, Transform
from flowforge.flows.model import Flow
from flowforge.flows.multiscale import FactorOut, Reshape, Squeeze


class ScaleHead(nn.Module):
    """``(B, C, H, W) -> (B, head_channels)``: Conv3x3 -> ActNorm -> ReLU -> global average pool."""

    def __init__(self, shape: tuple, head_channels: int):
        super().__init__()
        c, h, w = shape
        self.conv = nn.Conv2d(c, head_channels, 3, padding=1)
        self.norm = ActNorm((head_channels, h, w))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        z, _ = self.norm(self.conv(x))
        return self.act(z).mean(dim=(2, 3))


def _is_scale_end(t: nn.Module) -> bool:
    """A Squeeze between scales, or the Reshape that flattens the last scale."""
    return isinstance(t, Squeeze) or (isinstance(t, Reshape) and len(t.in_shape) == 3 and len(t.out_shape) == 1)


def feature_points(transform: Transform, shape: tuple) -> list[tuple[str, tuple]]:
    """``(module name, input shape)`` of every scale end of ``transform`` on inputs of ``shape``.

    Walks ``Compose`` and ``FactorOut`` (whose ``inner`` sees the factored-in channels) in forward
    order; a ``Squeeze``/``Reshape`` before any layer with parameters (``squeeze_first``) is no scale end.
    Every other layer is taken to keep the shape of its input.
    """
    points: list[tuple[str, tuple]] = []
    seen_params = False

    def walk(t: nn.Module, name: str, s: tuple) -> tuple:
        nonlocal seen_params
        prefix = f"{name}." if name else ""
        if isinstance(t, Compose):
            for i, sub in enumerate(t.transforms):
                s = walk(sub, f"{prefix}transforms.{i}", s)
            return s
        if isinstance(t, FactorOut):
            walk(t.inner, f"{prefix}inner", tuple(t.rest_shape))
            return (math.prod(s),)
        if _is_scale_end(t) and seen_params and len(s) == 3:
            points.append((name, s))
        if isinstance(t, Squeeze):
            c, h, w = s
            return (4 * c, h // 2, w // 2)
        if isinstance(t, Reshape):
            return tuple(t.out_shape)
        if any(True for _ in t.parameters()):
            seen_params = True
        return s

    walk(transform, "", tuple(shape))
    return points


class HybridClassifier(nn.Module):
    """A flow plus classification heads on its features (see the module docstring).

    ``forward(x) -> (log p(x), logits)`` with ``x`` as :meth:`Flow.log_prob` takes it (continuous,
    in [0, 1] for images); the flow runs once and the heads read its intermediate tensors.
    """

    def __init__(self, flow: Flow, num_classes: int, head_channels: int = 256):
        super().__init__()
        if int(num_classes) < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}; set objective.num_classes")
        if int(head_channels) < 1:
            raise ConfigError(f"head_channels must be >= 1, got {head_channels}; set objective.head_channels")
        self.flow = flow
        self.num_classes, self.head_channels = int(num_classes), int(head_channels)
        shape = tuple(flow.data_shape)
        self.point_names: list[str] = []
        self.point_shapes: list[tuple] = []
        if len(shape) == 1:
            self.heads = nn.ModuleList()
            self.linear = nn.Sequential(
                nn.Linear(shape[0], self.head_channels), nn.ReLU(), nn.Linear(self.head_channels, self.num_classes)
            )
            return
        points = feature_points(flow.transform, shape)
        if not points:
            raise ConfigError(
                f"{type(flow.transform).__name__} has no scale ends (Squeeze / final flat Reshape after a "
                f"learned layer) to attach classification heads to; use a multiscale image model such as "
                f"model=resflow"
            )
        self.point_names = [n for n, _ in points]
        self.point_shapes = [s for _, s in points]
        self.heads = nn.ModuleList(ScaleHead(s, self.head_channels) for s in self.point_shapes)
        self.linear = nn.Linear(self.head_channels * len(points), self.num_classes)

    @property
    def n_heads(self) -> int:
        return max(len(self.heads), 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.heads:
            z, log_det = self.flow(x)
            return self.flow.base.log_prob(z) + log_det, self.linear(z)
        feats: dict[int, Tensor] = {}
        handles = []
        for i, name in enumerate(self.point_names):

            def record(module: nn.Module, args: tuple, i: int = i) -> None:
                feats[i] = args[0]

            handles.append(self.flow.transform.get_submodule(name).register_forward_pre_hook(record))
        try:
            z, log_det = self.flow(x)
        finally:
            for h in handles:
                h.remove()
        pooled = []
        for i, (head, s) in enumerate(zip(self.heads, self.point_shapes)):
            f: Tensor | None = feats.get(i)
            if f is None or tuple(f.shape[1:]) != s:
                got = None if f is None else tuple(f.shape[1:])
                raise ConfigError(
                    f"classification head {i} expected features of shape {s} at '{self.point_names[i]}', "
                    f"got {got}; this flow changes shapes in ways the hybrid heads do not know: use model=resflow"
                )
            pooled.append(head(f))
        logits = self.linear(torch.cat(pooled, dim=1))
        return self.flow.base.log_prob(z) + log_det, logits
