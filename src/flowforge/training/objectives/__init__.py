"""Training objectives: the ``objective`` config group (``conf/objective/<name>.yaml``, each with a ``_target_``).

One class per objective, all with the interface of :class:`~flowforge.training.objectives.base.Objective`.
:func:`make_objective` also builds one from a config without ``_target_`` (as older checkpoints store it) by its
``name``.
"""

from __future__ import annotations

from flowforge.errors import FlowforgeError
from flowforge.training.objectives.base import MaximumLikelihood, Objective, likelihood_metrics
from flowforge.training.objectives.flow_matching import FlowMatching
from flowforge.training.objectives.hybrid import Classification, Hybrid
from flowforge.training.objectives.options import OBJECTIVES, parse_objective, resolve_lam
from flowforge.training.objectives.regression import Regression
from flowforge.training.objectives.reverse_kl import ReverseKL

#: the class of each ``objective=<name>`` choice
BY_NAME: dict[str, type[Objective]] = {
    cls.name: cls for cls in (MaximumLikelihood, Hybrid, Classification, Regression, FlowMatching, ReverseKL)
}


def make_objective(spec: Objective | dict | None) -> Objective:
    """``spec`` as an (unbound) objective: an :class:`Objective` as it is, ``None`` for maximum likelihood, a config
    dict through its ``_target_`` (Hydra) or, without one, the class its ``name`` names."""
    if isinstance(spec, Objective):
        return spec
    options = dict(spec or {})
    name = options.get("name", "mle")
    if name not in BY_NAME:
        parse_objective({"name": name}, 1)  # raises: the list of objectives
    if options.get("_target_") is not None:
        import hydra.errors
        import hydra.utils

        try:
            return hydra.utils.instantiate(options)
        except hydra.errors.InstantiationException as e:
            if isinstance(e.__cause__, FlowforgeError):
                raise e.__cause__ from None
            raise
    options.pop("_target_", None)
    return BY_NAME[name](**options)


__all__ = [
    "BY_NAME",
    "OBJECTIVES",
    "Classification",
    "FlowMatching",
    "Hybrid",
    "MaximumLikelihood",
    "Objective",
    "Regression",
    "ReverseKL",
    "likelihood_metrics",
    "make_objective",
    "parse_objective",
    "resolve_lam",
]
