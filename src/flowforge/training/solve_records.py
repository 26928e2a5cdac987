"""The fixed-point solves of a training step, as the implicit blocks record them.

Blocks with iterative solvers (residual inverses, implicit and monotone flows) keep a ``solves`` record whose
``last`` maps each kind of solve of the latest step (``forward``, ``inverse``, ``... backward``) to its statistics
(``iterations`` and ``converged`` per sample).  :func:`solve_records` is the one walk over them; the fault policy
reads the failures of a step from it and the module logs the iteration counts from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def solve_records(module: nn.Module) -> Iterator[tuple[str, str, Any]]:
    """``(block name, kind, stats)`` of every solve recorded in this step by the blocks of ``module``."""
    for name, m in module.named_modules():
        last = getattr(getattr(m, "solves", None), "last", None)
        if last is not None:
            for kind, stats in last.items():
                yield name, kind, stats


def failed_solves(module: nn.Module) -> list[str]:
    """``"<block> (<kinds>)"`` for each block whose solves of this step left samples unconverged (one device sync
    for all of them)."""
    records = list(solve_records(module))
    if not records:
        return []
    failed = torch.stack([(~stats.converged).any() for _, _, stats in records]).tolist()
    by_block: dict[str, list[str]] = {}
    for (name, kind, _), bad in zip(records, failed):
        if bad:
            by_block.setdefault(name, []).append(kind)
    return [f"{name} ({', '.join(kinds)})" for name, kinds in by_block.items()]
