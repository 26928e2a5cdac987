"""The fixed-point solves of a training step, as the implicit blocks record them.

Blocks with iterative solvers (residual inverses, implicit and monotone flows) keep a ``solves`` record whose
``last`` maps each kind of solve of the latest step (``forward``, ``inverse``, ``... backward``) to its statistics
(``iterations`` and ``converged`` per sample).  :func:`flowforge.flows.contractive_block.solve_records` is the one
walk over them; the fault policy reads the failures of a step from it, and the module logs the iteration counts
through :func:`~flowforge.flows.contractive_block.solver_summary`, which walks them with it too.
"""

from __future__ import annotations

import torch
from torch import nn

from flowforge.flows.contractive_block import solve_records

__all__ = ["failed_solves", "solve_records"]


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
