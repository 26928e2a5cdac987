"""Russian-roulette truncation of an infinite series (Chen et al., 2019, Residual Flows, Eq. 6).

For a series ``S = sum_{k>=1} a_k``, compute the first ``n_exact`` terms always, draw ``N ~ p(N)``
and compute ``N`` more; term ``k > n_exact`` is weighted by ``1 / P(N >= k - n_exact)``:

    S_hat = sum_{k=1}^{n_exact + N} a_k / P(N >= k - n_exact),   E[S_hat] = S

(unbiased whenever the series converges absolutely and ``P(N >= j) > 0`` for every j).

- geometric(p): ``N in {1, 2, ...}``, ``P(N >= j) = (1 - p)^(j - 1)``, ``E[N] = 1/p``.
- poisson(lambda): ``N in {0, 1, ...}``, ``P(N >= j) = 1 - sum_{i<j} e^-lambda lambda^i / i!``, ``E[N] = lambda``.

Draws use torch's global generator, so ``seed_everything`` and checkpointed RNG states cover them.
"""

from __future__ import annotations

import math

import torch

from flowforge.errors import ConfigError

DISTRIBUTIONS = ("geometric", "poisson")


class RouletteDistribution:
    def __init__(self, dist: str = "geometric", p: float = 0.5, lam: float = 2.0):
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"unknown roulette distribution '{dist}'; choose one of {DISTRIBUTIONS}")
        if dist == "geometric" and not 0.0 < p < 1.0:
            raise ConfigError(f"roulette geometric p must be in (0, 1), got {p}")
        if dist == "poisson" and not lam > 0.0:
            raise ConfigError(f"roulette poisson lambda must be > 0, got {lam}")
        self.dist, self.p, self.lam = dist, float(p), float(lam)

    @torch.compiler.disable
    def sample(self) -> int:
        """One draw of ``N``, made on the host from torch's global CPU generator (never a device tensor).

        ``N`` sets how many series terms a block computes, so the draw decides the shape of the step's graph:
        ``torch.compile`` runs it eagerly (a graph break here) and compiles the rest for each drawn ``N``."""
        if self.dist == "geometric":
            # inverse CDF: N = ceil(log U / log(1 - p)), U ~ U(0, 1]
            u = 1.0 - torch.rand(()).item()  # host sync: the roulette draw, a CPU tensor (no device involved)
            return max(1, math.ceil(math.log(u) / math.log1p(-self.p)))
        # host sync: the roulette draw, a CPU tensor (no device involved)
        return int(torch.poisson(torch.tensor(self.lam, dtype=torch.float64)).item())

    def survival(self, j: int) -> float:
        """``P(N >= j)``."""
        if j <= 0:
            return 1.0
        if self.dist == "geometric":
            return (1.0 - self.p) ** (j - 1)
        cdf = sum(math.exp(-self.lam) * self.lam**i / math.factorial(i) for i in range(j))
        return max(1.0 - cdf, 0.0)

    def mean(self) -> float:
        return 1.0 / self.p if self.dist == "geometric" else self.lam

    def coefficients(self, n_exact: int, n: int) -> list[float]:
        """Weights ``c_k`` of terms ``k = 1 .. n_exact + n`` for a draw ``N = n``."""
        out = []
        for k in range(1, n_exact + n + 1):
            s = self.survival(k - n_exact)
            if s <= 0.0:  # numerically zero tail probability: the term cannot be reweighted
                break
            out.append(1.0 / s)
        return out
