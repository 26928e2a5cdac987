"""Invertible residual block (Behrmann et al., 2019; Chen et al., 2019): ``y = x + g(x)``, Lip(g) < 1.

Forward: ``(x + g(x), log det(I + J_g(x)))`` with the configured :class:`LogDetEstimator`.
Inverse: the Banach fixed point of ``x = y - g(x)`` from ``x_0 = y - g(y)``, per-sample convergence
masks, tolerance on ``|dx|``; iterations and failures are kept in ``last_inverse`` and counted in
``inverse_failures``.  With ``on_fail="raise"`` an unconverged sample raises :class:`ConvergenceError`;
with ``"warn"`` (default) a warning names the count and the result is returned with its record.

Each block stores the roulette distribution's parameters (``roulette_logit_p`` = logit(p) and
``roulette_lam``) as frozen per-block parameters, as the reference implementation does (there they can
be tuned to reduce variance); the parameter counts of the published models include them.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError, ConvergenceError
from flowforge.estimators.logdet import LogDetEstimator
from flowforge.estimators.roulette import RouletteDistribution
from flowforge.flows.base import Transform
from flowforge.solvers.fixed_point import fixed_point
from flowforge.solvers.stats import SolverStats

log = logging.getLogger("flowforge")

ON_FAIL = ("warn", "raise")


class ResidualBlock(Transform):
    def __init__(
        self,
        g: nn.Module,
        estimator: Optional[LogDetEstimator] = None,
        inverse_atol: float = 1e-6,
        inverse_rtol: float = 1e-5,
        inverse_max_iters: int = 1000,
        on_fail: str = "warn",
    ):
        super().__init__()
        if on_fail not in ON_FAIL:
            raise ConfigError(f"inverse on_fail must be one of {ON_FAIL}, got '{on_fail}'")
        self.g = g
        self.logdet_estimator = estimator or LogDetEstimator("roulette")
        r = self.logdet_estimator.roulette
        self.roulette_logit_p = nn.Parameter(torch.tensor(math.log(r.p) - math.log1p(-r.p)), requires_grad=False)
        self.roulette_lam = nn.Parameter(torch.tensor(r.lam), requires_grad=False)
        self.inverse_atol, self.inverse_rtol, self.inverse_max_iters = inverse_atol, inverse_rtol, inverse_max_iters
        self.on_fail = on_fail
        self.last_inverse: Optional[SolverStats] = None
        self.inverse_failures = 0
        self.last_terms = 0

    def _roulette(self) -> RouletteDistribution:
        """The distribution from the block's parameters; rebuilt only when they change (saves two device
        synchronisations per block and step)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.roulette_logit_p, self.roulette_lam))
        cached = self.__dict__.get("_roulette_cache")
        if cached is None or cached[0] != key:
            r = self.logdet_estimator.roulette
            dist = RouletteDistribution(r.dist, float(torch.sigmoid(self.roulette_logit_p)), float(self.roulette_lam))
            cached = self.__dict__["_roulette_cache"] = (key, dist)
        return cached[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        roulette = self._roulette() if self.logdet_estimator.name == "roulette" else None
        gx, log_det, info = self.logdet_estimator(self.g, x, self.training, roulette)
        self.last_terms = info["terms"]
        return x + gx, log_det

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        def step(x_sub: Tensor, idx: Tensor) -> Tensor:
            return y[idx] - self.g(x_sub)

        x, stats = fixed_point(step, y - self.g(y), self.inverse_atol, self.inverse_rtol, self.inverse_max_iters)
        self.last_inverse = stats
        if stats.num_failed:
            self.inverse_failures += stats.num_failed
            msg = (f"residual-block inverse: {stats.num_failed} of {y.shape[0]} samples did not converge in "
                   f"{self.inverse_max_iters} fixed-point iterations (largest last step "
                   f"{float(stats.residual.max()):.3g}, tolerance atol={self.inverse_atol}, rtol={self.inverse_rtol}); "
                   f"check that Lip(g) < 1 (spectral norms) or raise inverse_max_iters")
            if self.on_fail == "raise":
                raise ConvergenceError(msg)
            log.warning(msg)
        return x.to(y.dtype)
