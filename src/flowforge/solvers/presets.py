"""The default solvers of the contractive blocks: the one place their methods and tolerances are set.

A block fills the keys a solver spec leaves out from its preset (``as_solver(spec, **asdict(preset))``):

- :data:`RESIDUAL_INVERSE`: a residual block's inverse ``x = y - g(x)``, the Banach (Picard) iteration
  of Behrmann et al. (2019);
- :data:`MONOTONE`: both solves of a monotone block, ``w +- g(w) = sqrt(2) x``: Anderson with two
  iterates (one secant step per iteration) and a Picard fallback, as the reference implementation;
- :data:`IMPLICIT_FORWARD` / :data:`IMPLICIT_INVERSE`: an implicit block's ``z = a - g_z(z)`` and
  ``x = a - g_x(x)``: limited-memory Broyden with a Picard fallback, as the reference implementation;
- :data:`ADJOINT`: the adjoint ``u (I + J_g) = v`` of implicit differentiation, tighter than the forward
  solves and with few iterations (Lip(g) < 1).
"""

from __future__ import annotations

from flowforge.solvers.solver import Solver

RESIDUAL_INVERSE = Solver("picard", atol=1e-6, rtol=1e-5, max_iters=1000)
MONOTONE = Solver("anderson", atol=1e-6, rtol=1e-6, max_iters=2000, memory=2, fallback_iters=2000)
IMPLICIT_FORWARD = Solver("broyden", atol=1e-6, rtol=1e-6, max_iters=100, memory=30, fallback_iters=1000)
IMPLICIT_INVERSE = Solver("broyden", atol=1e-5, rtol=1e-5, max_iters=100, memory=30, fallback_iters=1000)
ADJOINT = Solver("anderson", atol=1e-8, rtol=1e-6, max_iters=100, fallback_iters=100)
