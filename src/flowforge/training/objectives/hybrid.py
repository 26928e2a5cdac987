"""Hybrid modelling and classification by an invertible flow (Residual Flows, Sec. 6).

The flow is wrapped in a :class:`flowforge.flows.hybrid.HybridClassifier` and the per-example loss is

    L(x, y) = lam * (-log p(x)) + CrossEntropy(logits(x), y)

with ``-log p(x)`` in nats, total over the ``D`` dimensions, and ``lam`` a number >= 0 or ``"1/D"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flowforge.errors import ConfigError, DataError
from flowforge.flows.hybrid import HybridClassifier
from flowforge.training.objectives.base import Objective


class Hybrid(Objective):
    """``lam * (-log p(x)) + CE(logits(x), y)`` (module docstring); logs ``/nll``, ``/bpd`` (images), ``/ce`` and
    ``/acc``.  ``num_classes=None`` takes the dataset's ``num_classes``."""

    name = "hybrid"

    def __init__(self, lam: Any = "1/D", num_classes: int | None = None, head_channels: int = 256, name=None):
        super().__init__(name)
        self.lam, self.num_classes, self.head_channels = lam, num_classes, head_channels

    def given(self, config: dict | None = None) -> dict[str, Any]:
        num_classes = self.num_classes
        if num_classes is None:
            num_classes = ((config or {}).get("dataset") or {}).get("num_classes")
        return {"lam": self.lam, "num_classes": num_classes, "head_channels": self.head_channels}

    def check(self) -> None:
        self.classifier = HybridClassifier(self.model, self.num_classes, self.head_channels)

    def loss(self, batch: Any, x: Tensor, stage: str = "train") -> dict[str, Tensor]:
        return self.metrics(x, self.labels(batch))

    def labels(self, batch: Any) -> Tensor:
        """The batch's class labels, checked."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ConfigError(
                f"objective={self.name} needs class labels, but the batches of {self.dataset} carry "
                f"none; use a labelled dataset such as dataset=digits, mnist or cifar10 (or objective=mle)"
            )
        y = batch[1]
        if torch.is_floating_point(y) or torch.is_complex(y):
            raise DataError(
                f"labels must be integer class indices, got dtype {y.dtype}; store them as int64 (torch.long) "
                f"in the data module"
            )
        n = self.num_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
            raise ConfigError(
                f"labels range over [{int(y.min())}, {int(y.max())}] but objective.num_classes={n}; "
                f"set objective.num_classes to the dataset's number of classes"
            )
        return y

    def metrics(self, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        if y is None:
            raise ConfigError(f"objective={self.name} needs labels: call metrics(x, y)")
        model, lam = self.model, self.lam
        log_weight: Any = 0.0
        if model.is_image:
            x, log_weight = model.dequantizer(x)
        log_p, logits = self.classifier(x)
        nll = -(log_p + log_weight)
        ce = F.cross_entropy(logits, y, reduction="none")
        if lam == 0:
            nll = nll.detach()
            loss = ce
        else:
            loss = lam * nll + ce
        values = {"loss": loss, "nll": nll}
        if model.is_image:
            values["bpd"] = nll / (model.dim * math.log(2))
        values["ce"] = ce
        values["acc"] = (logits.argmax(1) == y).float()
        return values


class Classification(Hybrid):
    """Pure classification by the flow: :class:`Hybrid` with ``lam = 0`` (``nll`` and ``bpd`` are still logged,
    without gradient)."""

    name = "classification"

    def __init__(self, lam: Any = 0, num_classes: int | None = None, head_channels: int = 256, name=None):
        super().__init__(lam, num_classes, head_channels, name)
