"""Options of the ``objective`` config group, parsed and checked (each objective class applies them).

- ``mle`` (default): ``-log p(x)`` (nats, or bits/dim for images).
- ``hybrid`` / ``classification`` (Residual Flows, Sec. 6): ``lam * (-log p(x)) + CE(logits(x), y)``.
- ``regression`` (Implicit / Monotone Flows' 1-D fits): ``sum_d (F(x)_d - y_d)^2``.
- ``flow_matching`` (Lipman et al., 2023): the conditional flow-matching regression of a CNF's velocity.
- ``reverse_kl``: ``E_q[log q(x) - log p~(x)]`` for an unnormalised target ``p~`` (variational inference).
"""

from __future__ import annotations

import math
from typing import Any

from flowforge.errors import ConfigError

OBJECTIVES = ("mle", "hybrid", "classification", "regression", "flow_matching", "reverse_kl")


def resolve_lam(lam: Any, dim: int) -> float:
    """The likelihood weight: a number >= 0, or the string ``"1/D"`` for ``1 / dim``."""
    if isinstance(lam, str):
        text = lam.replace(" ", "")
        if text.upper() == "1/D":
            return 1.0 / dim
        try:
            lam = float(text)
        except ValueError:
            raise ConfigError(f"objective.lam must be a number >= 0 or '1/D', got '{lam}'") from None
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"objective.lam must be a number >= 0 or '1/D', got {lam!r}")
    return float(lam)


def parse_objective(objective: dict | None, dim: int) -> dict | None:
    """``None`` for maximum likelihood, else the objective's options, checked."""
    if objective is None:
        return None
    objective = dict(objective)
    name = objective.get("name", "mle")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}'; choose objective= one of {', '.join(OBJECTIVES)}")
    if name == "mle":
        return None
    if name in ("regression", "flow_matching"):
        return {"name": name}
    if name == "reverse_kl":
        n, eval_n = objective.get("n_samples"), objective.get("eval_samples", 4096)
        if n is not None and not _is_int(n, 1):
            raise ConfigError(f"objective.n_samples must be null (the batch size) or a positive integer, got {n!r}")
        if not _is_int(eval_n, 2):
            raise ConfigError(f"objective.eval_samples must be an integer >= 2 (e.g. 4096), got {eval_n!r}")
        return {"name": name, "n_samples": n, "eval_samples": int(eval_n)}
    lam = resolve_lam(objective.get("lam", 0 if name == "classification" else "1/D"), dim)
    if name == "classification" and lam != 0:
        raise ConfigError(
            f"objective=classification trains with lam=0, got objective.lam={objective.get('lam')}; "
            f"use objective=hybrid objective.lam=... to weight in the likelihood"
        )
    num_classes = objective.get("num_classes")
    if not _is_int(num_classes, 2):
        raise ConfigError(f"objective.num_classes must be an integer >= 2 (e.g. 10), got {num_classes!r}")
    head_channels = objective.get("head_channels", 256)
    if not _is_int(head_channels, 1):
        raise ConfigError(f"objective.head_channels must be a positive integer (e.g. 256), got {head_channels!r}")
    return {"name": name, "lam": lam, "num_classes": int(num_classes), "head_channels": int(head_channels)}


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
