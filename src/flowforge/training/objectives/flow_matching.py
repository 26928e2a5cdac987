"""Conditional flow matching (Lipman et al., 2023) for a model made of one CNF.

Training regresses the velocity on linear (optimal-transport) paths between data and noise,
``||v(x_t, t) - u_t||^2`` (:func:`flowforge.objectives.flow_matching.flow_matching_flow_loss`); validation and
test evaluate the likelihood through the ODE as under maximum likelihood, so bits/dim compare across objectives.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from flowforge.objectives.flow_matching import flow_matching_flow_loss, single_cnf
from flowforge.training.objectives.base import Objective


class FlowMatching(Objective):
    """Training loss ``/fm`` (the flow-matching regression); validation and test add the likelihood metrics."""

    name = "flow_matching"

    def check(self) -> None:
        single_cnf(self.model)  # a clear error now, not at the first step

    def loss(self, batch: Any, x: Tensor, stage: str = "train") -> dict[str, Tensor]:
        model = self.model
        fm = flow_matching_flow_loss(model, model.dequantizer(x)[0] if model.is_image else x)
        if stage == "train":
            return {"loss": fm, "fm": fm}
        return {**self.metrics(x), "fm": fm}
