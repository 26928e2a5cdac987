"""The ``estimator`` config group: how a residual block ``y = x + g(x)`` gets ``log det(I + J_g(x))``
(``kind="residual"``), and a monotone block ``log det(I - J_g(w)) - log det(I + J_g(w))``
(``kind="monotone"``, the odd series; see :mod:`flowforge.estimators.series`).

- ``exact``: the full Jacobian (:mod:`flowforge.estimators.exact`); low dimensions and checks.
- ``power_series``: the truncated series with ``n_terms`` terms and Hutchinson probes (i-ResNet;
  biased, the bias grows as Lip(g) -> 1).
- ``roulette``: ``n_exact_terms`` exact terms plus a Russian-roulette tail (unbiased; Residual Flows).

Options: ``probe`` (gaussian | rademacher) and ``n_probes`` (estimates averaged per sample);
``neumann_grad`` (O(1)-memory Neumann gradient series); ``mem_eff`` (backward-in-forward);
``eval_n_exact_terms`` (exact terms of the roulette series in eval mode, default 20, so the test
estimate has negligible variance); ``eval_exact_max_dim`` (inputs of at most this many dimensions use
the exact log-det in eval mode, e.g. the 2-D toys); ``fused`` (with ``neumann_grad``, a g that is a Lipschitz
MLP of linear layers and elementwise activations takes the hand-written route of
:mod:`flowforge.estimators.neumann_mlp`: the same value and gradient, a fraction of the operations; with or
without ``mem_eff``, whose memory it already has).

Every J^k v product uses the network's linearisation (``g.linearize``) when it has one, else
``torch.func.jvp``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.estimators.exact import MAX_EXACT_DIM, exact_logdet
from flowforge.estimators.hutchinson import PROBES, sample_probe
from flowforge.estimators.mem_eff import backward_in_forward
from flowforge.estimators.neumann_mlp import fused_neumann_logdet
from flowforge.estimators.roulette import RouletteDistribution
from flowforge.estimators.series import neumann_logdet, series_logdet

log = logging.getLogger("flowforge")

ESTIMATORS = ("exact", "power_series", "roulette")
KINDS = ("residual", "monotone")


def series_signs(kind: str, n: int) -> list[float]:
    """``a_1..a_n`` of ``sum_k a_k tr(J^k) / k``: ``(-1)^{k+1}`` (residual) or ``-2 [k odd]`` (monotone)."""
    if kind == "residual":
        return [float((-1) ** (k + 1)) for k in range(1, n + 1)]
    if kind == "monotone":
        return [-2.0 if k % 2 else 0.0 for k in range(1, n + 1)]
    raise ConfigError(f"unknown log-det kind '{kind}'; choose one of {KINDS}")


def linearize(g: nn.Module, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``(g(x), v -> J_g(x) v)``: the network's own linearisation, else forward-mode autograd."""
    if hasattr(g, "linearize"):
        return g.linearize(x)
    return g(x), lambda v: torch.func.jvp(g, (x,), (v,))[1]


class LogDetEstimator:
    """Configuration and dispatch of the residual-block log-det (see the module docstring)."""

    def __init__(
        self,
        name: str = "roulette",
        n_terms: int = 5,
        n_exact_terms: int = 2,
        dist: str = "geometric",
        p: float = 0.5,
        lam: float = 2.0,
        probe: str = "gaussian",
        n_probes: int = 1,
        neumann_grad: bool = False,
        mem_eff: bool = False,
        eval_n_exact_terms: int = 20,
        eval_exact_max_dim: int = 2,
        fused: bool = True,
    ):
        if name not in ESTIMATORS:
            raise ConfigError(
                "estimator=hutchinson is the CNF trace estimator; residual flows take exact, power_series or roulette"
                if name == "hutchinson"
                else f"unknown log-det estimator '{name}'; choose one of {ESTIMATORS}"
            )
        if probe not in PROBES:
            raise ConfigError(f"unknown Hutchinson probe '{probe}'; choose one of {PROBES}")
        for key, val, low in (
            ("n_terms", n_terms, 1),
            ("n_exact_terms", n_exact_terms, 0),
            ("n_probes", n_probes, 1),
            ("eval_n_exact_terms", eval_n_exact_terms, 0),
        ):
            if int(val) != val or val < low:
                raise ConfigError(f"estimator.{key} must be an integer >= {low}, got {val}")
        if name == "exact" and (neumann_grad or mem_eff):
            raise ConfigError(
                "estimator=exact computes the full Jacobian; neumann_grad and mem_eff apply to the series "
                "estimators (power_series, roulette): set them to false or choose a series estimator"
            )
        self.name, self.n_terms, self.n_exact_terms = name, int(n_terms), int(n_exact_terms)
        self.roulette = RouletteDistribution(dist, p, lam)
        self.probe, self.n_probes = probe, int(n_probes)
        self.neumann_grad, self.mem_eff = bool(neumann_grad), bool(mem_eff)
        self.eval_n_exact_terms, self.eval_exact_max_dim = int(eval_n_exact_terms), int(eval_exact_max_dim)
        self.fused = bool(fused)

    @property
    def stochastic(self) -> bool:
        return self.name != "exact"

    def __repr__(self) -> str:
        return (
            f"LogDetEstimator({self.name}, n_terms={self.n_terms}, n_exact={self.n_exact_terms}, "
            f"dist={self.roulette.dist}, probe={self.probe}x{self.n_probes}, "
            f"neumann_grad={self.neumann_grad}, mem_eff={self.mem_eff})"
        )

    def coefficients(self, training: bool, roulette: RouletteDistribution | None = None) -> list[float]:
        """Term weights for one draw (the roulette draw is shared by the batch)."""
        if self.name == "power_series":
            return [1.0] * self.n_terms
        roulette = roulette or self.roulette
        n_exact = self.n_exact_terms if training else self.eval_n_exact_terms
        return roulette.coefficients(n_exact, roulette.sample())

    def __call__(
        self,
        g: nn.Module,
        x: Tensor,
        training: bool,
        roulette: RouletteDistribution | None = None,
        kind: str = "residual",
    ) -> tuple[Tensor, Tensor, dict]:
        """``(g(x), log-det, info)`` with ``info = {"terms": number of series terms}``; the log-det is
        ``log det(I + J_g(x))`` for ``kind="residual"``, ``log det(I - J_g) - log det(I + J_g)`` for
        ``kind="monotone"``."""
        dim = x[0].numel()
        if self.name == "exact" or (not training and dim <= self.eval_exact_max_dim):
            y, jvp = linearize(g, x)
            return y, exact_logdet(jvp, x, kind), {"terms": 0}
        raw = self.coefficients(training, roulette)
        coeffs = [a * c for a, c in zip(series_signs(kind, len(raw)), raw)]
        probes = [sample_probe(x, self.probe) for _ in range(self.n_probes)]
        if self.neumann_grad and training and torch.is_grad_enabled() and self.fused:
            fused = fused_neumann_logdet(g, x, probes, coeffs)
            if fused is not None:
                y, est = fused
                return y, est, {"terms": len(coeffs)}
        series = neumann_logdet if (self.neumann_grad and training) else series_logdet

        def compute(xx: Tensor) -> tuple[Tensor, Tensor]:
            y, jvp = linearize(g, xx)
            est = sum(series(jvp, v, coeffs) for v in probes) / len(probes)
            return y, est

        if self.mem_eff and training and torch.is_grad_enabled():
            y, est = backward_in_forward(compute, x, list(g.parameters()))
        else:
            y, est = compute(x)
        return y, est, {"terms": len(coeffs)}


def as_estimator(estimator: None | dict | LogDetEstimator, dim: int) -> LogDetEstimator:
    """The block estimator from its config; ``name: auto`` resolves to ``exact`` for inputs of at most
    ``auto_exact_max_dim`` dimensions and to ``roulette`` (with the configured gradient options) otherwise."""
    if estimator is None:
        estimator = {"name": "auto"}
    if isinstance(estimator, LogDetEstimator):
        return estimator
    kwargs = {k: v for k, v in dict(estimator).items() if not str(k).startswith("_")}
    max_exact = kwargs.pop("auto_exact_max_dim", 2)
    if kwargs.get("name", "roulette") == "auto":
        kwargs["name"] = "exact" if dim <= max_exact else "roulette"
        if kwargs["name"] == "exact":
            kwargs.update(neumann_grad=False, mem_eff=False)
        log.info("estimator=auto resolved to %s for %d-dimensional data", kwargs["name"], dim)
    if kwargs.get("name") == "exact" and dim > MAX_EXACT_DIM:
        raise ConfigError(
            f"estimator=exact needs {dim} Jacobian-vector products per block for {dim}-dimensional data "
            f"(limit {MAX_EXACT_DIM}); use estimator=roulette, neumann_grad, mem_eff or power_series"
        )
    return LogDetEstimator(**kwargs)
