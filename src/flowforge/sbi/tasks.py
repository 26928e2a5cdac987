"""Benchmark tasks of simulation-based inference (Lueckmann et al., 2021, "Benchmarking Simulation-Based
Inference"; the sbibm package): a prior ``p(theta)`` and a simulator ``x ~ p(x | theta)`` for each, written in torch.

Neural posterior estimation (NPE) trains a conditional flow ``q(theta | x)`` on pairs ``theta ~ p(theta)``,
``x ~ p(x | theta)`` by maximum likelihood; its minimiser over all conditional densities is the posterior
``p(theta | x) = p(x | theta) p(theta) / p(x)``.

- ``gaussian_linear``: ``theta ~ N(0, 0.1 I_10)``, ``x | theta ~ N(theta, 0.1 I_10)``.  The posterior is Gaussian,
  ``N(Sigma (Sigma_l^{-1} x), Sigma)`` with ``Sigma = (Sigma_p^{-1} + Sigma_l^{-1})^{-1} = 0.05 I``: mean ``x / 2``.
- ``gaussian_mixture``: ``theta ~ U[-10, 10]^2``, ``x | theta ~ 1/2 N(theta, I) + 1/2 N(theta, 0.01 I)``.  The
  likelihood is symmetric in ``x`` and ``theta``, so the posterior is the same mixture centred at ``x`` truncated to
  the prior box (drawn exactly by rejection).
- ``two_moons``: ``theta ~ U[-1, 1]^2``; ``a ~ U(-pi/2, pi/2)``, ``r ~ N(0.1, 0.01^2)``,
  ``p = (r cos a + 0.25, r sin a)``, ``x = p + (-|z_0|, z_1)`` with ``z = R(-pi/4) theta`` (a rotation); a
  bimodal, crescent-shaped posterior.
- ``slcp`` (simple likelihood, complex posterior): ``theta ~ U[-3, 3]^5``; four points
  ``x_j ~ N(m, S)``, ``m = (theta_1, theta_2)``, ``s_1 = theta_3^2``, ``s_2 = theta_4^2``, ``rho = tanh theta_5``,
  ``S = [[s_1^2, rho s_1 s_2], [rho s_1 s_2, s_2^2]] + 10^-6 I``; ``x`` is the 8 coordinates of the four points.
- ``bernoulli_glm``: ``theta ~ N(0, B^{-1})`` (10 parameters: an offset and a 9-tap temporal filter; ``B`` has
  ``0.5`` for the offset and ``F^T F`` for the filter, ``F = D^2 + diag(sqrt(i / 9))`` with ``D`` the first-difference
  matrix), spikes ``y_t ~ Bernoulli(sigmoid(v_t^T theta))`` for ``t = 1..100`` with ``v_t = (1, I_t, ..., I_{t-8})``
  of a white-noise stimulus ``I`` (``numpy.random.RandomState(42)``, 100 steps), and the sufficient statistics
  ``x = (sum_t y_t, sum_t y_t v_t[1:])`` (spike count and spike-triggered sums; 10 numbers).

Every task draws from a ``torch.Generator`` so that simulations are reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from flowforge.errors import ConfigError


class Task:
    """A prior and a simulator (module docstring).  ``analytic``: whether :meth:`posterior_sample` draws from the
    exact posterior (no reference files needed)."""

    name = ""
    dim_theta = 0
    dim_x = 0
    analytic = False

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` parameters ``theta ~ p(theta)``, ``(n, dim_theta)`` float32."""
        raise NotImplementedError

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One simulation ``x ~ p(x | theta)`` per row of ``theta``, ``(n, dim_x)`` float32."""
        raise NotImplementedError

    def in_support(self, theta: Tensor) -> Tensor:
        """Whether each row of ``theta`` has positive prior density, ``(n,)`` bool."""
        return torch.isfinite(theta).all(1)

    def posterior_sample(self, x_o: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws of ``p(theta | x_o)`` (analytic tasks only)."""
        raise ConfigError(f"task {self.name} has no closed-form posterior; its reference samples come from files")


class _BoxPrior(Task):
    low = -1.0
    high = 1.0

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, self.dim_theta, generator=generator)
        return self.low + (self.high - self.low) * u

    def in_support(self, theta: Tensor) -> Tensor:
        return ((theta >= self.low) & (theta <= self.high)).all(1)


class GaussianLinear(Task):
    name, dim_theta, dim_x, analytic = "gaussian_linear", 10, 10, True
    prior_var = 0.1
    noise_var = 0.1

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return math.sqrt(self.prior_var) * torch.randn(n, self.dim_theta, generator=generator)

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return theta + math.sqrt(self.noise_var) * torch.randn(theta.shape, generator=generator)

    def posterior_params(self, x_o: Tensor) -> tuple[Tensor, float]:
        """Mean ``(dim,)`` and variance (the same in every dimension) of ``p(theta | x_o)``."""
        var = 1.0 / (1.0 / self.prior_var + 1.0 / self.noise_var)
        return var * x_o.reshape(-1).double() / self.noise_var, var

    def posterior_sample(self, x_o: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        mean, var = self.posterior_params(x_o)
        eps = torch.randn(n, self.dim_theta, generator=generator, dtype=torch.float64)
        return (mean + math.sqrt(var) * eps).float()


class GaussianMixture(_BoxPrior):
    name, dim_theta, dim_x, analytic = "gaussian_mixture", 2, 2, True
    low, high = -10.0, 10.0
    scales = (1.0, 0.1)

    def _mixture(self, centre: Tensor, generator: torch.Generator | None) -> Tensor:
        wide = torch.rand(centre.shape[0], 1, generator=generator) < 0.5
        scale = torch.where(wide, self.scales[0], self.scales[1])
        return centre + scale * torch.randn(centre.shape, generator=generator)

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self._mixture(theta, generator)

    def posterior_sample(self, x_o: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        out, have = [], 0
        for _ in range(1000):
            draw = self._mixture(x_o.reshape(1, -1).expand(max(2 * n, 64), -1), generator)
            draw = draw[self.in_support(draw)]
            out.append(draw)
            have += len(draw)
            if have >= n:
                return torch.cat(out)[:n]
        raise ConfigError(f"{self.name}: the observation {x_o.tolist()} lies too far outside the prior box")


class TwoMoons(_BoxPrior):
    name, dim_theta, dim_x = "two_moons", 2, 2
    low, high = -1.0, 1.0
    r_loc, r_scale, offset = 0.1, 0.01, 0.25

    @staticmethod
    def rotated(theta: Tensor) -> tuple[Tensor, Tensor]:
        """``z = R(-pi/4) theta``."""
        c, s = math.cos(-math.pi / 4), math.sin(-math.pi / 4)
        return c * theta[:, 0] - s * theta[:, 1], s * theta[:, 0] + c * theta[:, 1]

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = theta.shape[0]
        a = (torch.rand(n, generator=generator) - 0.5) * math.pi
        r = self.r_loc + self.r_scale * torch.randn(n, generator=generator)
        z0, z1 = self.rotated(theta)
        return torch.stack([r * torch.cos(a) + self.offset - z0.abs(), r * torch.sin(a) + z1], 1)


class SLCP(_BoxPrior):
    name, dim_theta, dim_x = "slcp", 5, 8
    low, high = -3.0, 3.0
    num_points = 4

    @staticmethod
    def covariance(theta: Tensor) -> Tensor:
        """``S(theta)``, ``(n, 2, 2)`` (module docstring)."""
        s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, torch.tanh(theta[:, 4])
        off = rho * s1 * s2
        cov = torch.stack([s1**2 + 1e-6, off, off, s2**2 + 1e-6], 1)
        return cov.reshape(-1, 2, 2)

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = theta.shape[0]
        chol = torch.linalg.cholesky(self.covariance(theta.double()))
        eps = torch.randn(n, self.num_points, 2, generator=generator, dtype=torch.float64)
        points = theta[:, None, :2].double() + torch.einsum("nij,npj->npi", chol, eps)
        return points.reshape(n, 2 * self.num_points).float()


class BernoulliGLM(Task):
    name, dim_theta, dim_x = "bernoulli_glm", 10, 10
    steps = 100

    def __init__(self):
        taps = self.dim_theta - 1
        stimulus = torch.from_numpy(np.random.RandomState(42).standard_normal(self.steps)).float()
        design = torch.zeros(self.steps, self.dim_theta)
        design[:, 0] = 1.0
        for lag in range(taps):
            design[lag:, 1 + lag] = stimulus[: self.steps - lag]
        self.design = design  # v_t as rows
        d = torch.eye(taps, dtype=torch.float64) - torch.diag(torch.ones(taps - 1, dtype=torch.float64), -1)
        f = d @ d + torch.diag(torch.sqrt(torch.arange(taps, dtype=torch.float64) / taps))
        precision = torch.zeros(self.dim_theta, self.dim_theta, dtype=torch.float64)
        precision[0, 0] = 0.5
        precision[1:, 1:] = f.T @ f
        self.precision = precision
        # theta = L^{-T} eps has covariance (L L^T)^{-1} = B^{-1} for B = L L^T
        self._chol = torch.linalg.cholesky(precision)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.dim_theta, n, generator=generator, dtype=torch.float64)
        return torch.linalg.solve_triangular(self._chol.T, eps, upper=True).T.float()

    def rates(self, theta: Tensor) -> Tensor:
        """``sigmoid(v_t^T theta)`` for every step, ``(n, steps)``."""
        return torch.sigmoid(theta @ self.design.T)

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        spikes = (torch.rand(theta.shape[0], self.steps, generator=generator) < self.rates(theta)).float()
        return torch.cat([spikes.sum(1, keepdim=True), spikes @ self.design[:, 1:]], 1)


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (GaussianLinear, GaussianMixture, TwoMoons, SLCP, BernoulliGLM)
}


def make_task(name: str) -> Task:
    """The task called ``name`` (:data:`TASKS`), or a :class:`ConfigError` listing them."""
    if name not in TASKS:
        raise ConfigError(f"unknown sbi task '{name}'; dataset.task must be one of {sorted(TASKS)}")
    return TASKS[name]()
