"""Generated data on manifolds: a von Mises-Fisher mixture on the sphere, a Dirichlet mixture on the simplex.

* ``VMFMixtureDataModule``: ``p(x) = sum_k w_k C_d(kappa_k) exp(kappa_k mu_k^T x)`` on S^{d-1} (surface
  measure), equal weights ``w_k = 1/K``; the K mean directions are uniform on the sphere, drawn from
  ``torch.Generator().manual_seed(1000 + seed)``.
* ``DirichletMixtureDataModule``: ``p(p) = sum_k w_k Dir(p; alpha_k)`` on the simplex (surface measure,
  see :mod:`flowforge.flows.manifold_distributions`); ``alpha_k = 1 + concentration * m_k`` with
  ``m_k ~ Dirichlet(1, ..., 1)`` from ``numpy.random.default_rng(1000 + seed)``.

Like the 2-D toys, split i (train, val, test) is drawn from its own seed ``3 * seed + i``, so runs are
reproducible and splits never share points.  Both modules expose ``manifold`` (``"sphere"`` /
``"simplex"``) and check every split lies on it (:class:`~flowforge.errors.DataError` otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from flowforge.data.base import FlowDataModule
from flowforge.errors import ConfigError
from flowforge.flows.manifold_distributions import sample_uniform_sphere, sample_vmf, vmf_log_normalizer
from flowforge.flows.manifold_flow import check_on_manifold


def _per_component(value: float | Sequence[float], k: int, name: str) -> list[float]:
    values = [value] * k if isinstance(value, (int, float)) and not isinstance(value, bool) else list(value)
    if len(values) != k or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v) for v in values
    ):
        raise ConfigError(f"dataset.{name} must be a positive number or a list of {k} positive numbers, got {value!r}")
    return [float(v) for v in values]


def _check_components(num_components: int) -> int:
    if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
        raise ConfigError(f"dataset.num_components must be a positive integer, got {num_components!r}")
    return num_components


class _ManifoldData(FlowDataModule):
    """Shared checks: the configured ``manifold`` and points on it."""

    manifold: str = ""

    def __init__(self, manifold: str | None = None, tol: float = 1e-4, **kwargs):
        if manifold is not None and manifold != self.manifold:
            raise ConfigError(
                f"{type(self).__name__} generates data on the {self.manifold}; dataset.manifold must be "
                f"'{self.manifold}' (or left out), got '{manifold}'"
            )
        super().__init__(**kwargs)
        if len(self.shape) != 1 or self.shape[0] < 2:
            raise ConfigError(
                f"dataset.shape must be [d] with d >= 2 for data on the {self.manifold}, got {list(self.shape)}"
            )
        self.tol = tol

    def check(self, x: torch.Tensor, split: str) -> torch.Tensor:
        x = super().check(x, split)
        check_on_manifold(x, self.manifold, self.tol, what=f"dataset '{self.label}': the {split} split")
        return x


class VMFMixtureDataModule(_ManifoldData):
    """A mixture of ``num_components`` vMF distributions on S^{d-1} (``shape = [d]``, default S^2)."""

    manifold = "sphere"

    def __init__(
        self,
        name: str = "vmf_mixture",
        num_components: int = 4,
        kappa: float | Sequence[float] = 20.0,
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 2000,
        **kwargs,
    ):
        kwargs.setdefault("shape", [3])
        super().__init__(name=name, **kwargs)
        self.num_components = _check_components(num_components)
        self.kappas = _per_component(kappa, self.num_components, "kappa")
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        g = torch.Generator().manual_seed(1000 + self.seed)
        self.mus = sample_uniform_sphere(self.num_components, self.shape[0], generator=g, dtype=torch.float64)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """``n`` points of the mixture (float64) from ``torch.Generator().manual_seed(seed)``."""
        g = torch.Generator().manual_seed(seed)
        comp = torch.randint(0, self.num_components, (n,), generator=g)
        x = torch.empty(n, self.shape[0], dtype=torch.float64)
        for k in range(self.num_components):
            idx = (comp == k).nonzero().flatten()
            if idx.numel():
                x[idx] = sample_vmf(self.mus[k], self.kappas[k], idx.numel(), generator=g)
        return x

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """The exact mixture log-density (w.r.t. surface measure) of points ``x``."""
        x = x.to(torch.float64)
        terms = torch.stack(
            [
                float(vmf_log_normalizer(torch.tensor(k, dtype=torch.float64), self.shape[0])) + k * (x @ mu)
                for mu, k in zip(self.mus, self.kappas)
            ],
            1,
        )
        return torch.logsumexp(terms, 1) - math.log(self.num_components)

    def load_splits(self):
        return {
            split: (self.sample(n, self.seed * 3 + i).float(), None) for i, (split, n) in enumerate(self.sizes.items())
        }


class DirichletMixtureDataModule(_ManifoldData):
    """A mixture of ``num_components`` Dirichlet distributions on the simplex in R^n (``shape = [n]``)."""

    manifold = "simplex"

    def __init__(
        self,
        name: str = "dirichlet_mixture",
        num_components: int = 3,
        concentration: float = 20.0,
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 2000,
        **kwargs,
    ):
        kwargs.setdefault("shape", [3])
        super().__init__(name=name, **kwargs)
        self.num_components = _check_components(num_components)
        if (
            isinstance(concentration, bool)
            or not isinstance(concentration, (int, float))
            or not 0 < concentration < math.inf
        ):
            raise ConfigError(f"dataset.concentration must be a positive number (e.g. 20.0), got {concentration!r}")
        conc = float(concentration)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        rng = np.random.default_rng(1000 + self.seed)
        self.alphas = 1.0 + conc * rng.dirichlet(np.ones(self.shape[0]), self.num_components)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """``n`` points of the mixture (float64) from ``numpy.random.default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        comp = rng.integers(0, self.num_components, n)
        x = np.empty((n, self.shape[0]))
        for k in range(self.num_components):
            idx = np.nonzero(comp == k)[0]
            x[idx] = rng.dirichlet(self.alphas[k], idx.size)
        return torch.from_numpy(x)

    def log_density(self, p: torch.Tensor) -> torch.Tensor:
        """The exact mixture log-density (w.r.t. the simplex's surface measure) of points ``p``."""
        p = p.to(torch.float64)
        alphas = torch.from_numpy(self.alphas)
        log_norm = torch.lgamma(alphas.sum(1)) - torch.lgamma(alphas).sum(1) - 0.5 * math.log(self.shape[0])
        terms = log_norm + torch.log(p) @ (alphas - 1).T
        return torch.logsumexp(terms, 1) - math.log(self.num_components)

    def load_splits(self):
        return {
            split: (self.sample(n, self.seed * 3 + i).float(), None) for i, (split, n) in enumerate(self.sizes.items())
        }
