"""RNODE regularisation of continuous flows (Finlay et al., 2020) in the training loss.

CNF blocks with weights ``model.kinetic`` / ``model.jacobian`` record, during their forward pass, the per-example
penalty ``kinetic * int ||v||^2 dt + jacobian * int ||J_v||_F^2 dt``; it is added to the training loss.
"""

from __future__ import annotations

from torch import Tensor, nn

from flowforge.flows.cnf import cnf_blocks, cnf_regularization


def rnode_penalty(model: nn.Module) -> tuple[Tensor | None, dict[str, float]]:
    """The per-example penalty recorded by the CNF blocks of ``model`` in this step's forward (None without one) and
    the unweighted integrals summed over the blocks (``{"kinetic": ..., "jacobian": ...}``)."""
    penalty = cnf_regularization(model)
    if penalty is None:
        return None, {}
    terms: dict[str, float] = {}
    for block in cnf_blocks(model):
        for k, v in block.last_reg_terms.items():
            terms[k] = terms.get(k, 0.0) + float(v)
    return penalty, terms
