"""The divergence of a velocity field, ``div v(x) = tr(dv/dx)``, the integrand of a CNF's log-determinant

    d log|det dx(t)/dx(0)| / dt = tr(dv/dx (x(t), t))        (continuous change of variables).

- :func:`exact_divergence`: ``sum_i (dv/dx)_ii``, one vector-Jacobian product per input dimension (done as
  one batched backward pass when autograd can vectorise it); for low dimensions and checks.
  :func:`exact_divergence_jvp` computes the same from the function by forward mode (``D`` Jacobian-vector
  products in one vectorised pass); the CNF uses it.
- :func:`hutchinson_divergence`: ``eps^T (dv/dx) eps`` with ``E[eps eps^T] = I`` (FFJORD), one
  vector-Jacobian product ``eps^T dv/dx`` per probe, averaged over the probes.  Unbiased; the caller
  draws the probes once per ODE solve and keeps them fixed over time, so the integral of the estimates is
  itself an unbiased estimate of the log-determinant.  The same products give RNODE's Frobenius-norm
  estimate ``||dv/dx||_F^2 = E ||eps^T dv/dx||^2``.

Both take ``v_out = v(x)`` already computed from an ``x`` that requires grad, and differentiate it with
``create_graph`` (needed whenever the divergence itself must be differentiated: training, adjoints).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flowforge.estimators.hutchinson import batch_dot, sample_probe

TRACES = ("exact", "hutchinson")


def _vjp(v_out: Tensor, x: Tensor, cotangent: Tensor, create_graph: bool, batched: bool = False) -> Tensor:
    (g,) = torch.autograd.grad(
        v_out,
        x,
        cotangent,
        create_graph=create_graph,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=batched,
    )
    if g is None:  # v does not depend on x
        shape = (cotangent.shape[0], *x.shape) if batched else x.shape
        return x.new_zeros(shape)
    return g


def exact_divergence(v_out: Tensor, x: Tensor, create_graph: bool = True) -> Tensor:
    """``tr(dv/dx)`` per sample, shape ``(B,)``, from the full Jacobian diagonal (``D`` VJPs)."""
    b, d = x.shape[0], x[0].numel()
    basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    try:  # all D products in one vectorised backward pass
        rows = _vjp(v_out, x, basis.contiguous(), create_graph, batched=True).reshape(d, b, d)
        return torch.diagonal(rows, dim1=0, dim2=2).sum(1)
    except RuntimeError:  # an op without a batching rule: one product per dimension
        total = x.new_zeros(b)
        for i in range(d):
            row = _vjp(v_out, x, basis[i], create_graph).reshape(b, d)
            total = total + row[:, i]
        return total


def exact_divergence_jvp(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``tr(d fn/dx)`` per sample, shape ``(B,)``, by forward mode: the ``D`` Jacobian-vector products
    ``J e_i`` run as one vectorised (``torch.func.vmap``) pass of ``fn``.  Cheaper than :func:`exact_divergence`
    and records a much smaller autograd graph (one batched copy of ``fn`` instead of one per dimension), which
    matters when the divergence is differentiated again (training, adjoints).  Falls back to the reverse-mode
    :func:`exact_divergence` when ``fn`` has an operation without forward-mode or batching support."""
    b, d = x.shape[0], x[0].numel()
    basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    try:
        cols = torch.func.vmap(lambda e: torch.func.jvp(fn, (x,), (e,))[1])(basis)
    except (RuntimeError, NotImplementedError):
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xx = x if x.requires_grad else x.detach().requires_grad_(True)
            return exact_divergence(fn(xx), xx, create_graph=keep_graph)
    return torch.diagonal(cols.reshape(d, b, d), dim1=0, dim2=2).sum(1)


def draw_probes(like: Tensor, kind: str = "gaussian", n: int = 1) -> Tensor:
    """``n`` probes shaped like ``like``, stacked: ``(n, *like.shape)`` (gaussian | rademacher)."""
    return torch.stack([sample_probe(like, kind) for _ in range(int(n))])


def hutchinson_divergence(
    v_out: Tensor,
    x: Tensor,
    eps: Tensor | Sequence[Tensor],
    create_graph: bool = True,
    return_frobenius: bool = False,
):
    """``mean_k eps_k^T (dv/dx) eps_k`` per sample, shape ``(B,)``.

    ``eps``: one probe shaped like ``x``, or several stacked along a new first dimension (or a list).
    With ``return_frobenius`` also returns ``mean_k ||eps_k^T dv/dx||^2`` (RNODE's Jacobian term)."""
    probes = [eps] if isinstance(eps, Tensor) and eps.shape == x.shape else list(eps)
    div, frob = x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
    for e in probes:
        e_j = _vjp(v_out, x, e, create_graph)
        div = div + batch_dot(e_j, e)
        if return_frobenius:
            frob = frob + e_j.reshape(x.shape[0], -1).pow(2).sum(1)
    div, frob = div / len(probes), frob / len(probes)
    return (div, frob) if return_frobenius else div
