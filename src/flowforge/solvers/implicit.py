"""Implicit differentiation of a fixed point (the implicit function theorem, as in DEQs / ImpFlow).

For ``x* = T(x*; theta)`` solved without a graph, the gradient of a loss L with respect to theta (and
to the inputs T closes over) is

    dL/dtheta = u^T dT/dtheta (x*),   where   u = dL/dx* + J_T(x*)^T u,

a linear fixed-point problem solved with the same methods (``backward`` solver); the transposed
products ``J_T^T u`` are vector-Jacobian products of one re-attached evaluation ``f = T(x*)``.  The
returned tensor has the value ``x*`` and the graph of ``f``; a hook replaces the incoming gradient
``dL/dx*`` with ``u`` so back-propagation through ``f`` delivers the implicit gradient.  Memory is
that of one evaluation of T, whatever the number of forward iterations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowforge.solvers.iteration import Step
from flowforge.solvers.solver import Solver
from flowforge.solvers.stats import SolverStats


def implicit_solve(
    step: Step,
    x0: Tensor,
    forward: Solver,
    backward: Solver,
    on_backward: Callable[[SolverStats], None] | None = None,
) -> tuple[Tensor, SolverStats]:
    """Solve ``x = T(x)`` (``T`` given by ``step(x_sub, idx)``) and attach implicit gradients.

    Without grad mode (or when T depends on nothing that requires grad) this is ``forward(step, x0)``.
    ``on_backward`` receives the adjoint solve's stats during back-propagation.
    """
    with torch.no_grad():
        x_star, stats = forward(step, x0)
    if not torch.is_grad_enabled():
        return x_star, stats
    z = x_star.detach().requires_grad_(True)
    with torch.autocast(device_type=z.device.type, enabled=False):
        f = step(z, torch.arange(z.shape[0], device=z.device))
    if not f.requires_grad:
        return x_star, stats
    out = x_star + (f - f.detach())

    def adjoint(grad: Tensor) -> Tensor:
        def adj_step(u_sub: Tensor, idx: Tensor) -> Tensor:
            u = torch.zeros_like(grad)
            u[idx] = u_sub.to(grad.dtype)
            (vjp,) = torch.autograd.grad(f, z, u, retain_graph=True)
            return grad[idx] + vjp[idx]

        u, bstats = backward(adj_step, grad)
        if on_backward is not None:
            on_backward(bstats)
        return u.to(grad.dtype)

    out.register_hook(adjoint)
    return out, stats
