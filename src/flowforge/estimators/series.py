"""Power-series log-determinants of maps built from a contraction g (Lip(g) < 1), in the form

    sum_{k>=1} a_k tr(J_g^k) / k

- residual block ``x + g(x)``:  log det(I + J_g),  ``a_k = (-1)^{k+1}``            (Behrmann et al., 2019)
- monotone block (Cayley transform of g):  log det(I - J_g) - log det(I + J_g) = -2 sum_{k odd} tr(J_g^k)/k,
  ``a_k = -2`` for odd k, 0 for even k                                             (Ahn et al., 2022)

estimated with Hutchinson probes, ``tr(J^k) ~ v^T J^k v``, and term weights ``w_k = a_k c_k`` (``c_k``
all 1 for the truncated i-ResNet series, ``1 / P(N >= k - n_exact)`` for the Russian-roulette series).

Gradients, two ways:
- :func:`series_logdet` builds the autograd graph of every term (memory grows with the number of terms).
- :func:`neumann_logdet` uses the Neumann gradient series (Chen et al., 2019, Eq. 8):

      d/dtheta log det(I + J) = tr((I + J)^{-1} dJ/dtheta),   (I + J)^{-1} = sum_{k>=0} (-1)^k J^k,

  the derivative of the weighted series term by term being
  ``sum_{k=1}^{n} w_k tr(J^{k-1} dJ)  ~  v^T dJ u``  with  ``u = sum_k w_k J^{k-1} v`` (for the monotone
  series the odd-power Neumann series of ``(I - J^2)^{-1}``).
  ``w`` is built without a graph and the surrogate ``v^T J w`` carries the gradient: memory is O(1) in
  the number of terms.  The returned *value* is the series estimate itself (computed without a graph),
  never the surrogate: ``estimate + (surrogate - surrogate.detach())``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flowforge.estimators.hutchinson import batch_dot

Jvp = Callable[[Tensor], Tensor]


def series_logdet(jvp: Jvp, v: Tensor, weights: Sequence[float]) -> Tensor:
    """``sum_k w_k v^T J^k v / k`` per sample (differentiable when grad mode is on)."""
    w, est = v, v.new_zeros(v.shape[0])
    last = max((k for k, c in enumerate(weights, start=1) if c), default=0)
    for k, c in enumerate(weights[:last], start=1):
        w = jvp(w)
        if c:
            est = est + (c / k) * batch_dot(v, w)
    return est


@torch.no_grad()
def neumann_series(jvp: Jvp, v: Tensor, weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Without a graph: the estimate ``sum_k w_k v^T J^k v / k`` per sample and the Neumann vector
    ``u = sum_k w_k J^{k-1} v`` whose surrogate ``v^T J u`` carries the gradient."""
    last = max((k for k, c in enumerate(weights, start=1) if c), default=0)
    w, est, acc = v, v.new_zeros(v.shape[0]), torch.zeros_like(v)
    for k, c in enumerate(weights[:last], start=1):
        if c:
            acc.add_(w, alpha=c)  # w = J^{k-1} v here
        w = jvp(w)
        if c:
            est.add_(batch_dot(v, w), alpha=c / k)
    return est, acc


def neumann_logdet(jvp: Jvp, v: Tensor, weights: Sequence[float]) -> Tensor:
    """The series estimate as value, with the Neumann-series gradient."""
    est, acc = neumann_series(jvp, v, weights)
    if not torch.is_grad_enabled():
        return est
    surrogate = batch_dot(v, jvp(acc))
    return est + (surrogate - surrogate.detach())
