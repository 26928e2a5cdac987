"""Reverse KL (variational inference): fit the flow ``q`` to an unnormalised density ``p~`` (``dataset=target``).

Each step draws ``n_samples`` pathwise samples ``x ~ q`` and minimises the mean of ``log q(x) - log p~(x)``
(``KL(q || p) - log Z``, :func:`flowforge.objectives.reverse_kl.reverse_kl_loss`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowforge.errors import ConfigError
from flowforge.flows.base import samples_pathwise
from flowforge.flows.registry import families
from flowforge.objectives.reverse_kl import importance_log_z, reverse_kl_loss
from flowforge.training.objectives.base import Objective


class ReverseKL(Objective):
    """Loss ``log q(x') - log p~(x')`` for ``n_samples`` draws ``x' ~ q`` (default: the batch size); validation and
    test also log ``/nll`` of the batch's exact target samples and, from ``eval_samples`` importance samples,
    ``/log_z`` (``log mean w``, ``w = p~/q``), ``/log_z_se``, ``/log_z_error`` (against the target's exact
    ``log Z``), ``/elbo`` and ``/ess`` (effective sample size / n)."""

    name = "reverse_kl"

    def __init__(self, n_samples: int | None = None, eval_samples: int = 4096, name=None):
        super().__init__(name)
        self.n_samples, self.eval_samples = n_samples, eval_samples

    def given(self, config: dict | None = None) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "eval_samples": self.eval_samples}

    def check(self) -> None:
        if self.target is None:
            raise ConfigError(
                "objective=reverse_kl fits a flow to an unnormalised target density, but none was given; "
                "use dataset=target (dataset.name=mixture2d, banana or funnel)"
            )
        if not samples_pathwise(self.model.transform):
            switches = ", ".join(
                f"{f.pathwise} for {f.name}" for f in families().values() if isinstance(f.pathwise, str)
            )
            raise ConfigError(
                "objective=reverse_kl needs samples that are differentiable in the parameters, but this model "
                f"inverts some layer without gradient (planar flows invert by bisection); use {switches}, "
                "or another family"
            )

    def loss(self, batch: Any, x: Tensor, stage: str = "train") -> dict[str, Tensor]:
        loss, _, _ = reverse_kl_loss(self.model, self.target, self.n_samples or x.shape[0])
        values = {"loss": loss}
        if stage != "train":
            values["nll"] = -self.model.log_prob(x)
        return values

    def evaluate(self, stage: str) -> dict[str, float]:
        """Importance-sampling estimates of ``log Z``, its standard error, the ELBO and the ESS fraction."""
        with torch.no_grad():
            est = importance_log_z(self.model, self.target, self.eval_samples)
        values = {"log_z": est["log_z"], "log_z_se": est["log_z_se"], "elbo": est["elbo"], "ess": est["ess_fraction"]}
        if getattr(self.target, "log_z", None) is not None:
            values["log_z_error"] = float(est["log_z"]) - float(self.target.log_z)
        return {k: float(v) for k, v in values.items()}
