"""Regression with the flow as a function (the 1-D fitting experiments of Implicit and Monotone Flows).

Batches are ``(y, x)`` (``dataset=step1d``); the model maps the input through its forward ``z = F(x)`` and the
per-example loss is the squared error ``sum_d (z_d - y_d)^2``.  No likelihood is computed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowforge.errors import ConfigError
from flowforge.training.objectives.base import Objective


class Regression(Objective):
    """``loss = sum_d (F(x)_d - y_d)^2`` per example; ``/mse`` logs it divided by the dimension ``D``.  Figures
    show the fit (:func:`flowforge.training.visualize.fit_plot_1d`)."""

    name = "regression"
    figure = "fit"

    def loss(self, batch: Any, x: Tensor, stage: str = "train") -> dict[str, Tensor]:
        """``z = F(x)`` for the batch's input ``x = batch[1]``; per-example ``loss = sum_d (z_d - y_d)^2``
        against the target ``y = batch[0]`` and ``mse = loss / D``."""
        x = batch[1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
        if x is None or not torch.is_floating_point(x) or tuple(x.shape[1:]) != self.model.data_shape:
            found = "no inputs" if x is None else f"a second tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
            raise ConfigError(
                f"objective=regression needs batches (target y, input x) of real vectors of the model's shape, "
                f"but the batches of {self.dataset} carry {found}; use dataset=step1d (or objective=mle)"
            )
        z, _ = self.model(x)
        se = (z - batch[0]).pow(2).flatten(1).sum(1)
        return {"loss": se, "mse": se / self.model.dim}
