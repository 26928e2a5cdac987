"""2-D toy densities whose shape depends on a continuous context ``c`` in [0, 1]: data for ``p(x | c)``.

Each example draws its own ``c ~ U[0, 1]`` and then ``x ~ p(x | c)``:

- ``moons``: the two interleaved half circles of the moons toy, pulled apart by ``s(c) = 0.5 c`` (the upper
  moon moves up and left, the lower one down and right) and the whole picture rotated by ``theta(c) = (pi / 2) c``;
- ``rings``: two concentric rings of radii ``r(c)`` and ``2 r(c)`` with ``r(c) = 0.5 + c`` (Gaussian radial noise
  of standard deviation 0.08).

Each split is drawn from its own fixed seed, so runs are reproducible and splits never share points.  Batches are
``(x, c)`` with ``c`` of shape ``(batch, 1)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowforge.data.base import FlowDataModule
from flowforge.errors import ConfigError


def conditional_moons(rng: np.random.Generator, c: np.ndarray) -> np.ndarray:
    """One point of the moons toy per context ``c`` (module docstring), shape ``(len(c), 2)``."""
    n = len(c)
    t = rng.uniform(0, math.pi, n)
    upper = rng.integers(0, 2, n).astype(bool)
    s = 0.5 * c
    x = np.where(upper, np.cos(t) - s, 1 - np.cos(t) + s)
    y = np.where(upper, np.sin(t) + s, 0.5 - np.sin(t) - s)
    p = (np.stack([x, y], 1) + 0.05 * rng.standard_normal((n, 2))) * 2 - np.array([1.0, 0.5])
    theta = 0.5 * math.pi * c
    cos, sin = np.cos(theta), np.sin(theta)
    return np.stack([cos * p[:, 0] - sin * p[:, 1], sin * p[:, 0] + cos * p[:, 1]], 1)


def conditional_rings(rng: np.random.Generator, c: np.ndarray) -> np.ndarray:
    """One point of the two rings per context ``c`` (module docstring), shape ``(len(c), 2)``."""
    n = len(c)
    radius = (0.5 + c) * rng.integers(1, 3, n) + 0.08 * rng.standard_normal(n)
    angle = rng.uniform(0, 2 * math.pi, n)
    return np.stack([np.cos(angle), np.sin(angle)], 1) * radius[:, None]


CONDITIONAL_TOYS = {"moons": conditional_moons, "rings": conditional_rings}


def sample_conditional_toy(name: str, c: torch.Tensor | np.ndarray, seed: int = 0) -> torch.Tensor:
    """Points ``x ~ p(x | c)`` of the named toy, one per context (``c``: shape ``(n,)`` or ``(n, 1)``), float32."""
    if name not in CONDITIONAL_TOYS:
        raise ConfigError(f"unknown conditional toy '{name}'; dataset.name must be one of {sorted(CONDITIONAL_TOYS)}")
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    return torch.from_numpy(CONDITIONAL_TOYS[name](np.random.default_rng(seed), c)).float()


class ConditionalToy2DDataModule(FlowDataModule):
    """Conditional 2-D toys (module docstring); ``name`` picks one of :data:`CONDITIONAL_TOYS`."""

    def __init__(
        self,
        name: str = "moons",
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 2000,
        context: dict | None = None,
        **kwargs,
    ):
        kwargs.setdefault("shape", [2])
        if name not in CONDITIONAL_TOYS:
            raise ConfigError(
                f"unknown conditional toy '{name}'; dataset.name must be one of {sorted(CONDITIONAL_TOYS)}"
            )
        context = {"features": 1} if context is None else context
        super().__init__(name=name, context=context, **kwargs)
        if self.context != {"features": 1}:
            raise ConfigError(
                f"dataset={name} (toy2d_conditional) has one context number c; set context: {{features: 1}}"
            )
        if self.shape != (2,):
            raise ConfigError(f"dataset.shape must be [2] for the 2-D conditional toys, got {list(self.shape)}")
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}

    def load_splits(self):
        out = {}
        for i, (split, n) in enumerate(self.sizes.items()):
            rng = np.random.default_rng(self.seed * 3 + i + 1000)
            c = rng.uniform(0, 1, n)
            out[split] = (sample_conditional_toy(self.name, c, seed=self.seed * 3 + i), torch.from_numpy(c)[:, None])
        return out
