"""The interface every training objective implements, and maximum likelihood, the default.

An objective is built from its ``objective`` config group entry (Hydra ``_target_``) and bound to a model by
:class:`flowforge.training.module.FlowModule`.  It answers four questions:

- :meth:`Objective.bind`: does it apply to this model, this data and this target (a clear error if not)?
- :meth:`Objective.loss`: the per-example values of a batch, ``"loss"`` (minimised) and the metrics logged beside it;
- :meth:`Objective.evaluate`: metrics of the whole model at the end of a validation or test epoch;
- :attr:`Objective.figure`: which figure shows a run (``"density"`` or ``"fit"``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.training.batches import batch_context
from flowforge.training.objectives.options import parse_objective


def likelihood_metrics(model: nn.Module, x: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
    """Per-example ``nll = -log p(x)`` (nats; ``-log p(x | c)`` for a conditional model) and, for images, ``bpd = nll
    / (D log 2)``; ``loss`` is ``bpd`` for images and ``nll`` otherwise."""
    if model.is_image:
        bpd = model.bits_per_dim(x) if context is None else model.bits_per_dim(x, context)
        return {"loss": bpd, "bpd": bpd, "nll": bpd * model.dim * math.log(2)}
    nll = -(model.log_prob(x) if context is None else model.log_prob(x, context))
    return {"loss": nll, "nll": nll}


class Objective:
    """What :class:`~flowforge.training.module.FlowModule` minimises (module docstring).

    ``name`` is the objective's choice in the config group (``objective=<name>``); a config whose ``name`` names
    another objective is an error.
    """

    name = "mle"
    figure = "density"
    #: whether the objective trains a conditional model p(x | c) (reading the context from the batch)
    conditional = False

    def __init__(self, name: str | None = None):
        if name is not None and name != self.name:
            parse_objective({"name": name}, 1)  # an unknown name: the list of objectives
            raise ConfigError(f"objective.name={name} does not match {type(self).__name__} (objective={self.name})")
        self.model: Any = None
        self.target: Any = None
        self.dataset = "this dataset"
        self.classifier: nn.Module | None = None

    def given(self, config: dict | None = None) -> dict[str, Any]:
        """The options as configured (checked by :meth:`bind`; ``config``: the run's, for defaults from the data)."""
        return {}

    def bind(self, model: nn.Module, config: dict | None = None, target: Any = None) -> Objective:
        """Check the options against ``model`` (its dimension, its family), the run's ``config`` (its dataset)
        and the unnormalised ``target`` density, and keep them for :meth:`loss`."""
        self.model, self.target = model, target
        self.dataset = ((config or {}).get("dataset") or {}).get("name") or "this dataset"
        for key, value in (parse_objective({"name": self.name, **self.given(config)}, model.dim) or {}).items():
            setattr(self, key, value)
        if getattr(model, "conditional", False) and not self.conditional:
            raise ConfigError(
                f"objective={self.name} does not train conditional models p(x | c) yet; use objective=mle, or an "
                "unconditional model (dataset.conditional=false)"
            )
        self.check()
        return self

    def check(self) -> None:
        """Errors for a model this objective cannot train (after the options are set)."""

    def loss(self, batch: Any, x: Tensor, stage: str = "train") -> dict[str, Tensor]:
        """Per-example values of ``batch`` (``x``: its input tensor) at ``stage`` (train, val or test): ``"loss"``
        is minimised, every value is logged as ``<stage>/<key>``.  A conditional model reads its context from the
        batch (:func:`~flowforge.training.batches.batch_context`)."""
        return likelihood_metrics(self.model, x, batch_context(self.model, batch))

    def metrics(self, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        """Likelihood metrics of ``x`` (:func:`likelihood_metrics`)."""
        return likelihood_metrics(self.model, x)

    def evaluate(self, stage: str) -> dict[str, float]:
        """Metrics of the model as a whole, logged as ``<stage>/<key>`` at the end of a validation or test epoch."""
        return {}


class MaximumLikelihood(Objective):
    """Maximum likelihood: per-example loss ``-log p(x)`` in nats for vector data, or bits per dimension
    ``-(log p(y) - D log K) / (D log 2)`` for images after dequantisation; logs ``/nll`` and (images) ``/bpd``.
    A conditional model is trained on ``-log p(x | c)``."""

    name = "mle"
    conditional = True
