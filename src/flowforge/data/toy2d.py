"""Generated 2-D toy densities (the FFJORD / Residual Flows set) and the 1-D multiple step function.

Each split is drawn from its own fixed seed, so runs are reproducible and splits never share points.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowforge.data.base import FlowDataModule
from flowforge.errors import ConfigError


def _8gaussians(rng, n):
    centers = np.array([(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4]) * 2
    return (centers[rng.integers(0, 8, n)] + 0.2 * rng.standard_normal((n, 2))) * 1.414


def _checkerboard(rng, n):
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


def _moons(rng, n):
    t = rng.uniform(0, math.pi, n)
    upper = rng.integers(0, 2, n).astype(bool)
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return (np.stack([x, y], 1) + 0.05 * rng.standard_normal((n, 2))) * 2 - np.array([1.0, 0.5])


def _pinwheel(rng, n, arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    labels = rng.integers(0, arms, n)
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angles = 2 * math.pi * labels / arms + rate * np.exp(feats[:, 0])
    rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], 1).reshape(-1, 2, 2)
    return 2 * np.einsum("ni,nij->nj", feats, rot)


def _2spirals(rng, n):
    t = np.sqrt(rng.uniform(0, 1, n)) * 540 * (2 * math.pi) / 360
    sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)
    x = np.stack([-np.cos(t) * t, np.sin(t) * t], 1) * sign[:, None]
    return (x + rng.uniform(0, 1, (n, 2)) * 0.5) / 3


def _rings(rng, n):
    radius = rng.integers(1, 5, n).astype(float)
    angle = rng.uniform(0, 2 * math.pi, n)
    x = np.stack([np.cos(angle), np.sin(angle)], 1) * radius[:, None]
    return (x + 0.08 * rng.standard_normal((n, 2))) * 0.9


def _circles(rng, n):
    radius = np.where(rng.integers(0, 2, n) == 0, 1.0, 0.5)
    angle = rng.uniform(0, 2 * math.pi, n)
    x = np.stack([np.cos(angle), np.sin(angle)], 1) * radius[:, None]
    return (x + 0.08 * rng.standard_normal((n, 2))) * 3


def _swissroll(rng, n):
    t = 1.5 * math.pi * (1 + 2 * rng.uniform(0, 1, n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1)
    return (x + rng.standard_normal((n, 2))) / 5


TOY_DENSITIES = {
    "8gaussians": _8gaussians,
    "checkerboard": _checkerboard,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "2spirals": _2spirals,
    "rings": _rings,
    "circles": _circles,
    "swissroll": _swissroll,
}


def sample_toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of the named 2-D toy density as float32, from ``numpy.random.default_rng(seed)``."""
    if name not in TOY_DENSITIES:
        raise ConfigError(f"unknown toy dataset '{name}'; dataset.name must be one of {sorted(TOY_DENSITIES)}")
    return torch.from_numpy(TOY_DENSITIES[name](np.random.default_rng(seed), n)).float()


class Toy2DDataModule(FlowDataModule):
    """2-D toy densities; ``name`` picks one of :data:`TOY_DENSITIES`."""

    def __init__(
        self, name: str = "checkerboard", n_train: int = 20000, n_val: int = 2000, n_test: int = 2000, **kwargs
    ):
        kwargs.setdefault("shape", [2])
        super().__init__(name=name, **kwargs)
        if name not in TOY_DENSITIES:
            raise ConfigError(f"unknown toy dataset '{name}'; dataset.name must be one of {sorted(TOY_DENSITIES)}")
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}

    def load_splits(self):
        return {
            split: (sample_toy(self.name, n, seed=self.seed * 3 + i), None)
            for i, (split, n) in enumerate(self.sizes.items())
        }


def step_function(x: torch.Tensor, steps: int = 4, riser: float = 0.05, tread_slope: float = 0.05) -> torch.Tensor:
    """The 1-D multiple step function on [-2, 2]: ``steps`` equal treads of slope ``tread_slope``
    joined by risers of width ``riser`` that climb 1 each (slope 1/riser = 20): a strictly increasing,
    hard-to-fit target with slopes between 0.05 and 20."""
    width = 4.0 / steps
    pos = (x + 2.0) / width
    k = torch.floor(pos).clamp(0, steps - 1)
    frac = (pos - k) * width
    rise = ((frac - (width - riser)) / riser).clamp(0, 1)
    return k + rise + tread_slope * (x + 2.0) - 0.5 * steps


class Step1DDataModule(FlowDataModule):
    """1-D data: ``x ~ U[-2, 2]`` and ``y = step_function(x)``.

    Batches are ``(y, x)``: the density models fit the distribution of ``y`` (a 1-D density with
    plateaus of mass), and regression experiments map ``x`` to ``y``.
    """

    def __init__(self, name: str = "step1d", n_train: int = 20000, n_val: int = 2000, n_test: int = 2000, **kwargs):
        kwargs.setdefault("shape", [1])
        super().__init__(name=name, **kwargs)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}

    def load_splits(self):
        out = {}
        for i, (split, n) in enumerate(self.sizes.items()):
            g = torch.Generator().manual_seed(self.seed * 3 + i)
            x = torch.rand(n, 1, generator=g) * 4 - 2
            out[split] = (step_function(x), x)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from torch.utils.data import TensorDataset

        for split, (y, x) in self.load_splits().items():
            self.splits[split] = TensorDataset(self.check(y, split), x)
