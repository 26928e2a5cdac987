"""Checks of a training, validation or test batch that hold whatever the objective."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flowforge.errors import DataError


def batch_input(model: nn.Module, batch: Any, stage: str = "train", step: int = 0) -> Tensor:
    """The input tensor of ``batch`` (its first tensor), checked against ``model``'s shape and for a floating
    dtype; outside training also for NaN/inf values (a NaN/inf in a training batch is a fault, handled by the fault
    policy)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    model.check_input(x)
    if not torch.is_floating_point(x):
        raise DataError(
            f"batch at step {step} has dtype {x.dtype}, "
            "but flows take real-valued inputs of a floating "
            f"dtype (image pixels as integer-valued floats); convert the data with .float() in the data module"
        )
    if stage != "train" and not torch.isfinite(x).all():
        raise DataError(
            f"{stage} batch contains {int((~torch.isfinite(x)).sum())} NaN/inf values; check the dataset files"
        )
    return x
