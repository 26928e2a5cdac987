"""A linear-Gaussian conditional density with a closed form, for exactness checks of conditional flows.

    c ~ N(0, I_K),    x | c ~ N(A c + b, Sigma),    x in R^D,

with ``A`` (D x K), ``b`` (D) and ``Sigma = L L^T`` (D x D) fixed by the dimensions (drawn once from a generator
seeded with ``(D, K)``, the same in every run).  The conditional log-density and entropy are known exactly:

    log p(x | c) = -1/2 (x - A c - b)^T Sigma^{-1} (x - A c - b) - 1/2 log det(2 pi Sigma),
    H[x | c]     = 1/2 log det(2 pi e Sigma)   (the same for every c),

so a conditional flow's test NLL ``E[-log q(x | c)]`` is at least ``H[x | c]`` and reaches it exactly when
``q(x | c) = p(x | c)``.  Batches are ``(x, c)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowforge.data.base import FlowDataModule
from flowforge.errors import ConfigError, DataError


class ConditionalGaussian:
    """``p(x | c) = N(x; A c + b, Sigma)`` and ``p(c) = N(0, I)`` (module docstring), in float64."""

    def __init__(self, dim: int, context_dim: int):
        if dim < 1 or context_dim < 1:
            raise ConfigError(f"the conditional Gaussian needs dim >= 1 and context_dim >= 1, got {dim}, {context_dim}")
        self.dim, self.context_dim = dim, context_dim
        g = torch.Generator().manual_seed(1000 * dim + context_dim)
        self.A = torch.randn(dim, context_dim, generator=g, dtype=torch.float64) / math.sqrt(context_dim)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        lower = torch.randn(dim, dim, generator=g, dtype=torch.float64).tril(-1) * 0.5
        diag = 0.3 + 0.7 * torch.rand(dim, generator=g, dtype=torch.float64)
        self.L = lower + torch.diag(diag)  # Sigma = L L^T, diagonal of L in [0.3, 1]

    @property
    def covariance(self) -> Tensor:
        return self.L @ self.L.T

    def mean(self, c: Tensor) -> Tensor:
        """``A c + b`` per row of ``c`` ``(n, K)``."""
        return c.to(torch.float64) @ self.A.T + self.b

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``(x, c)``, float64."""
        c = torch.randn(n, self.context_dim, generator=generator, dtype=torch.float64)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.mean(c) + eps @ self.L.T, c

    def log_prob(self, x: Tensor, c: Tensor) -> Tensor:
        """``log p(x | c)`` per row (module docstring), float64."""
        if x.shape[-1] != self.dim or c.shape[-1] != self.context_dim or x.shape[:-1] != c.shape[:-1]:
            raise DataError(
                f"the conditional Gaussian takes x (n, {self.dim}) and c (n, {self.context_dim}); got "
                f"{tuple(x.shape)} and {tuple(c.shape)}"
            )
        r = x.to(torch.float64) - self.mean(c)
        y = torch.linalg.solve_triangular(self.L, r.unsqueeze(-1), upper=False).squeeze(-1)
        half_log_det = torch.log(torch.diagonal(self.L)).sum()
        return -0.5 * (y**2).sum(-1) - half_log_det - 0.5 * self.dim * math.log(2 * math.pi)

    def entropy(self) -> float:
        """``H[x | c] = 1/2 log det(2 pi e Sigma)`` in nats (module docstring)."""
        half_log_det = float(torch.log(torch.diagonal(self.L)).sum())
        return half_log_det + 0.5 * self.dim * (1.0 + math.log(2 * math.pi))


class ConditionalGaussianDataModule(FlowDataModule):
    """Pairs ``(x, c)`` of :class:`ConditionalGaussian`; ``shape: [D]`` and ``context: {features: K}`` set the
    dimensions.  ``target`` is the closed-form density."""

    def __init__(
        self,
        name: str = "conditional_gaussian",
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 2000,
        context: dict | None = None,
        **kwargs,
    ):
        kwargs.setdefault("shape", [2])
        super().__init__(name=name, context={"features": 2} if context is None else context, **kwargs)
        if len(self.shape) != 1:
            raise ConfigError(f"dataset.shape must be [D] for the conditional Gaussian, got {list(self.shape)}")
        self.density = ConditionalGaussian(self.shape[0], self.context["features"])
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}

    def load_splits(self):
        out = {}
        for i, (split, n) in enumerate(self.sizes.items()):
            x, c = self.density.sample(n, torch.Generator().manual_seed(self.seed * 3 + i))
            out[split] = (x.float(), c.float())
        return out
