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
    if stage != "train":
        c = batch_context(model, batch)
        if c is not None and torch.is_floating_point(c) and not torch.isfinite(c).all():
            raise DataError(
                f"{stage} batch has {int((~torch.isfinite(c)).sum())} NaN/inf values in its context vectors; check "
                "the dataset's contexts"
            )
    return x


def batch_finite(model: nn.Module, batch: Any, x: Tensor) -> Tensor:
    """Whether the training batch is finite, as a boolean device tensor: its input ``x`` and, for a conditional
    model with context vectors, its context (labels are checked by the model)."""
    finite = torch.isfinite(x).all()
    c = batch_context(model, batch)
    if c is not None and torch.is_floating_point(c):
        finite = finite & torch.isfinite(c).all()
    return finite


def nonfinite_values(model: nn.Module, batch: Any, x: Tensor) -> Tensor:
    """The values of a training batch that :func:`batch_finite` checks, flattened into one tensor (for the count of
    NaN/inf values in a fault report)."""
    c = batch_context(model, batch)
    if c is None or not torch.is_floating_point(c):
        return x
    return torch.cat([x.reshape(-1), c.reshape(-1).to(x.dtype)])


def batch_context(model: nn.Module, batch: Any) -> Tensor | None:
    """The context of ``batch`` for a conditional model (its second tensor: a class label or a context vector per
    example), None for an unconditional model (which ignores labels a batch may carry); a clear error when a
    conditional model gets a batch without one."""
    if not getattr(model, "conditional", False):
        return None
    c = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if c is None:
        raise DataError(
            "the model is conditional but the batches carry no context; use a dataset with one (class labels with "
            "dataset.conditional=true, or a conditional dataset such as dataset=sbi)"
        )
    return c
