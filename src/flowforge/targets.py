"""Unnormalised target densities for reverse-KL / variational inference, with exact normalisers.

A target is an unnormalised density ``p~(x) = Z p(x)`` known pointwise, where ``p`` is a probability
density and ``Z = integral p~(x) dx``.  Each target here exposes

- ``log_prob(x)``: ``log p~(x)`` per sample (shape ``(batch,)``), computed in the dtype and on the
  device of ``x`` and differentiable in ``x`` (the pathwise gradient of reverse KL flows through it);
- ``log_z``: the exact ``log Z`` (a float), so estimates ``log Z_hat`` of a fitted flow can be scored;
- ``sample(n, generator=None)``: exact samples from ``p`` (validation data, plots, forward-KL / NLL
  evaluation of a reverse-KL fit);
- ``dim`` and ``name``.

The densities (``c`` = ``log_constant``, an optional shift so that ``log Z`` can be moved at will):

- ``mixture2d``: ``log p~(x) = c + log sum_k exp(-|x - mu_k|^2 / (2 sigma^2))`` with ``K`` centres
  ``mu_k = r (cos 2 pi k / K, sin 2 pi k / K)``; ``log Z = c + log K + log(2 pi sigma^2)``.
- ``banana`` (Haario et al., 2001, "twisted Gaussian"): ``x_1 ~ N(0, s^2)``,
  ``x_2 | x_1 ~ N(b (x_1^2 - s^2), 1)``, ``x_{3..D} ~ N(0, 1)``;
  ``log p~(x) = c - x_1^2 / (2 s^2) - (x_2 - b (x_1^2 - s^2))^2 / 2 - sum_{i>2} x_i^2 / 2``.  The
  shear ``(x_1, x_2) -> (x_1, x_2 - b (x_1^2 - s^2))`` has unit Jacobian, so by the change of variables
  ``Z`` is the Gaussian's: ``log Z = c + D/2 log(2 pi) + log s``.
- ``funnel`` (Neal, 2003): ``v = x_1 ~ N(0, s^2)``, ``x_i | v ~ N(0, e^v)`` for ``i = 2..D``;
  ``log p~(x) = c - v^2 / (2 s^2) - (D - 1) v / 2 - e^{-v} sum_{i>1} x_i^2 / 2``;
  ``log Z = c + D/2 log(2 pi) + log s``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flowforge.errors import ConfigError, DataError

LOG_2PI = math.log(2 * math.pi)


class Target:
    """Base class: an unnormalised density on R^dim with known ``log_z`` and exact ``sample``."""

    name: str = "target"

    def __init__(self, dim: int, log_constant: float = 0.0):
        self.dim = int(dim)
        self.log_constant = float(log_constant)

    @property
    def log_z(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def options(self) -> dict[str, Any]:
        """The options that rebuild this target with :func:`make_target`."""
        return {"log_constant": self.log_constant}

    def check_input(self, x: Tensor) -> None:
        """Raise a :class:`DataError` unless ``x`` has shape ``(batch, dim)``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise DataError(
                f"target '{self.name}' expects points of shape (batch, {self.dim}), got {tuple(x.shape)}; "
                f"build the flow for dataset.shape=[{self.dim}] (or the target with dim={x.shape[-1]})"
            )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{type(self).__name__}(dim={self.dim}, {opts})"


class GaussianMixture2D(Target):
    """``K`` equal-weight isotropic Gaussians of standard deviation ``std`` on a circle of ``radius``,
    left unnormalised: ``log p~(x) = c + logsumexp_k(-|x - mu_k|^2 / (2 std^2))``,
    ``log Z = c + log K + log(2 pi std^2)``."""

    name = "mixture2d"

    def __init__(self, num_components: int = 8, radius: float = 3.0, std: float = 0.5, log_constant: float = 0.0):
        super().__init__(2, log_constant)
        self.num_components, self.radius, self.std = int(num_components), float(radius), float(std)
        angles = torch.arange(self.num_components, dtype=torch.float64) * (2 * math.pi / self.num_components)
        self.centers = self.radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)  # (K, 2), float64

    @property
    def log_z(self) -> float:
        return self.log_constant + math.log(self.num_components) + math.log(2 * math.pi * self.std**2)

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_input(x)
        mu = self.centers.to(device=x.device, dtype=x.dtype)
        sq = (x.unsqueeze(1) - mu).square().sum(-1)  # (B, K)
        return torch.logsumexp(sq * (-0.5 / self.std**2), dim=1) + self.log_constant

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        k = torch.randint(0, self.num_components, (n,), generator=generator)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centers[k] + self.std * eps).to(dtype)

    def options(self) -> dict[str, Any]:
        return {"num_components": self.num_components, "radius": self.radius, "std": self.std, **super().options()}


class Banana(Target):
    """Haario's twisted Gaussian: ``x_1 ~ N(0, scale^2)``, ``x_2 | x_1 ~ N(curvature (x_1^2 - scale^2), 1)``,
    the other coordinates standard normal; ``log Z = c + D/2 log(2 pi) + log scale`` (unit-Jacobian shear)."""

    name = "banana"

    def __init__(self, dim: int = 2, curvature: float = 0.5, scale: float = 2.0, log_constant: float = 0.0):
        super().__init__(dim, log_constant)
        self.curvature, self.scale = float(curvature), float(scale)

    @property
    def log_z(self) -> float:
        return self.log_constant + 0.5 * self.dim * LOG_2PI + math.log(self.scale)

    def _shift(self, x1: Tensor) -> Tensor:
        return self.curvature * (x1.square() - self.scale**2)

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x1, x2, rest = x[:, 0], x[:, 1], x[:, 2:]
        out = -0.5 * (x1 / self.scale).square() - 0.5 * (x2 - self._shift(x1)).square()
        if rest.shape[1]:
            out = out - 0.5 * rest.square().sum(1)
        return out + self.log_constant

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        g = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x1 = self.scale * g[:, 0]
        x2 = g[:, 1] + self._shift(x1)
        return torch.cat([x1[:, None], x2[:, None], g[:, 2:]], 1).to(dtype)

    def options(self) -> dict[str, Any]:
        return {"curvature": self.curvature, "scale": self.scale, **super().options()}


class Funnel(Target):
    """Neal's funnel: ``v = x_1 ~ N(0, scale^2)``, ``x_i | v ~ N(0, e^v)`` (i >= 2), left unnormalised by
    ``(2 pi)^{D/2} scale``: ``log Z = c + D/2 log(2 pi) + log scale``."""

    name = "funnel"

    def __init__(self, dim: int = 2, scale: float = 3.0, log_constant: float = 0.0):
        super().__init__(dim, log_constant)
        self.scale = float(scale)

    @property
    def log_z(self) -> float:
        return self.log_constant + 0.5 * self.dim * LOG_2PI + math.log(self.scale)

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_input(x)
        v, rest = x[:, 0], x[:, 1:]
        # x_i^2 e^{-v}: overflows to +inf (log p~ = -inf, the right limit) only where v < -88 in float32
        quad = rest.square().sum(1) * torch.exp(-v)
        return -0.5 * (v / self.scale).square() - 0.5 * (self.dim - 1) * v - 0.5 * quad + self.log_constant

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        g = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        v = self.scale * g[:, :1]
        return torch.cat([v, torch.exp(0.5 * v) * g[:, 1:]], 1).to(dtype)

    def options(self) -> dict[str, Any]:
        return {"scale": self.scale, **super().options()}


TARGETS = {"mixture2d": GaussianMixture2D, "banana": Banana, "funnel": Funnel}

# option -> (check, description) for the range checks of make_target
_CHECKS = {
    "num_components": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "radius": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "std": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "curvature": (lambda v: math.isfinite(v), "a finite number"),
    "scale": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "log_constant": (lambda v: math.isfinite(v), "a finite number"),
}
_OPTIONS = {
    "mixture2d": ("num_components", "radius", "std", "log_constant"),
    "banana": ("curvature", "scale", "log_constant"),
    "funnel": ("scale", "log_constant"),
}


def make_target(name: str, dim: int = 2, **options: Any) -> Target:
    """Build the target ``name`` (one of :data:`TARGETS`) on R^dim.

    ``options`` are the target's keyword arguments (see :data:`_OPTIONS`); ``None`` values mean "the
    default" (so a config can list every option as null).  Unknown names, options that do not apply
    to the chosen target and out-of-range values raise a :class:`ConfigError` naming the fix.
    """
    if name not in TARGETS:
        raise ConfigError(f"unknown target '{name}'; dataset.name must be one of {sorted(TARGETS)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ConfigError(f"target '{name}' needs an integer dim >= 2, got dim={dim!r}; set dataset.dim to 2 or more")
    if name == "mixture2d" and dim != 2:
        raise ConfigError(
            f"target 'mixture2d' is 2-dimensional, got dim={dim}; set dataset.dim=2 (or use banana/funnel)"
        )
    allowed = _OPTIONS[name]
    kwargs = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in allowed:
            raise ConfigError(
                f"option '{key}' does not apply to target '{name}' (its options: {list(allowed)}); "
                f"remove it or set it to null"
            )
        check, what = _CHECKS[key]
        try:
            ok = check(value if key == "num_components" else float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"target '{name}': option {key} must be {what}, got {value!r}")
        kwargs[key] = value
    if name != "mixture2d":
        kwargs["dim"] = dim
    return TARGETS[name](**kwargs)
