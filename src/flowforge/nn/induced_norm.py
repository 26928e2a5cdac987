"""Layers normalised in an induced mixed (p, q) operator norm (Residual Flows, Chen et al. 2019, "learning
norm orders"): ``||A||_{p->q} = max_{||v||_p = 1} ||A v||_q`` kept below ``coeff``,

    W_hat = W / max(1, sigma_hat / coeff),        sigma_hat = ||A(W) v||_q / ||v||_p   (v fixed).

``sigma_hat`` is a lower bound of ``||A(W)||_{p->q}`` for any ``v``, tight when ``v`` maximises the ratio.  ``v``
comes from the generalised power method (Higham 1992; Johnston): with the dual map of a vector for the norm r

    d_r(x) = sign(x) |x|^(r-1) / ||x||_r^(r-1)      (||d_r(x)||_{r*} = 1 and <d_r(x), x> = ||x||_r),

iterate   v <- d_{p*}(A^T u),   u <- d_q(A v),   sigma = ||A v||_q / ||v||_p,   with p* = p / (p - 1).

The fixed points satisfy the first-order (KKT) conditions of the maximisation; for p = q = 2 this is
ordinary power iteration and the norm is the spectral norm.  Otherwise the maximisation is not concave (2 -> 1
and inf -> q norms are NP-hard in general) and the method finds a local maximum, i.e. a lower bound: the first
call starts from the 2 -> 2 singular vectors and from ``restarts`` random vectors and keeps the best.
Two cases have closed forms, used exactly (no iteration): p = 1 gives the largest q-norm of a column of A
(the l1 ball's extreme points are the basis vectors), q = inf the largest p*-norm of a row of A (for a
convolution, columns/rows are clipped kernels, computed by convolving |W|^r with ones).

With ``learn_p=True`` the orders are learnable: ``p = 1 + 4 sigmoid(raw)`` in (1, 5), one raw parameter each
for the domain and the codomain; gradients reach them through ``sigma_hat`` (by the envelope theorem the
derivative of the norm w.r.t. p equals that of the ratio at the fixed maximiser v).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.nn.lipschitz import _TINY, LipschitzLayer, _LipschitzConv2d, _LipschitzLinear, _no_autocast

Order = float | Tensor


def _lp_norm(x: Tensor, r: Order) -> Tensor:
    """``||x||_r`` over all entries; ``r`` may be a float (inf allowed) or a differentiable 0-dim tensor."""
    if not isinstance(r, Tensor):
        return torch.linalg.vector_norm(x, ord=r)
    a = x.abs().reshape(-1)
    m = a.amax().clamp_min(_TINY)  # scale so large r neither overflows nor underflows
    # (pow's exponent gradient treats 0^r as having d/dr = 0; exp(r log s) would give 0 * -inf = nan)
    return m * ((a / m) ** r).sum() ** (1.0 / r)


def _dual(x: Tensor, r: float) -> Tensor:
    """``d_r(x) = sign(x)|x|^(r-1) / ||x||_r^(r-1)`` for finite ``r >= 1`` (zero stays zero)."""
    y = x / x.abs().amax().clamp_min(_TINY)  # the map is scale invariant
    if r == 1.0:
        return torch.sign(y)
    return torch.sign(y) * y.abs().pow(r - 1.0) / torch.linalg.vector_norm(y, ord=r).clamp_min(_TINY).pow(r - 1.0)


def _conjugate(p: float) -> float:
    """Hoelder conjugate ``p* = p / (p - 1)`` (1 <-> inf)."""
    if p == 1.0:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


def _raw_order(p: float) -> float:
    """Inverse of ``p = 1 + 4 sigmoid(raw)``."""
    t = (p - 1.0) / 4.0
    return math.log(t / (1.0 - t))


class _InducedNorm:
    """Mixin replacing the 2 -> 2 norm of :class:`~flowforge.nn.lipschitz.LipschitzLayer` by p -> q."""

    def _setup_orders(self, domain, codomain, learn_p: bool) -> None:
        name = type(self).__name__
        for label, p in (("domain", domain), ("codomain", codomain)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p < 1:
                raise ConfigError(f"{name}: {label} norm order must be a number in [1, inf], got {p!r}")
            if learn_p and not 1.0 < p < 5.0:
                raise ConfigError(
                    f"{name}: with learn_p=True the {label} order is 1 + 4 sigmoid(raw) in (1, 5), "
                    f"so its initial value must lie in (1, 5), got {p!r}"
                )
        self.learn_p = bool(learn_p)
        if self.learn_p:
            self.raw_domain = nn.Parameter(torch.tensor(_raw_order(float(domain))))
            self.raw_codomain = nn.Parameter(torch.tensor(_raw_order(float(codomain))))
        else:
            self._domain = float(domain)
            self._codomain = float(codomain)

    @property
    def domain(self) -> Order:
        """Order p of the input norm (a differentiable tensor when learned, else a float)."""
        if self.learn_p:
            return 1.0 + 4.0 * torch.sigmoid(self.raw_domain)
        return self._domain

    @property
    def codomain(self) -> Order:
        """Order q of the output norm (a differentiable tensor when learned, else a float)."""
        if self.learn_p:
            return 1.0 + 4.0 * torch.sigmoid(self.raw_codomain)
        return self._codomain

    def _orders(self) -> tuple[float, float]:
        if self.learn_p:
            with torch.no_grad():
                return float(self.domain), float(self.codomain)
        return self._domain, self._codomain

    def _closed_form(self) -> bool:
        if self.learn_p:  # learned orders lie in (1, 5): never p = 1 or q = inf (and no host read of them)
            return False
        p, q = self._orders()
        return p == 1.0 or math.isinf(q)

    def _exact_norm(self, w: Tensor) -> Tensor:
        """Closed forms: ``p = 1`` -> max_j ||A e_j||_q;  ``q = inf`` -> max_i ||A^T e_i||_{p*}."""
        p, q = self._orders()
        if p == 1.0:
            return self._max_column_norm(w, q)
        return self._max_row_norm(w, _conjugate(p))

    def _power_step(self, u: Tensor, v: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p, q = self._orders()
        v = _dual(self._adj(u, w), _conjugate(p))
        y = self._op(v, w)
        sigma = torch.linalg.vector_norm(y, ord=q) / torch.linalg.vector_norm(v, ord=p).clamp_min(_TINY)
        u = _dual(y, q)
        return u, v, sigma

    #: random restarts (besides the spectral start) of the first, uninitialised power iteration
    restarts: int = 16
    #: the generalised power method iterates one vector pair (the block method is for the spectral norm)
    power_block = 1
    #: the first estimate comes from the generalised power method with restarts (Lanczos is for the 2 -> 2 norm)
    lanczos_init = False

    def power_iteration(
        self, max_iters: int | None = None, rtol: float | None = None, atol: float | None = None
    ) -> int:
        """Generalised power method (see module docstring); returns the iterations run (0 for the closed
        forms p = 1 or q = inf, which set ``sigma`` exactly).

        For p != q or p = q != 2 the maximisation is not concave and the method finds a *local* maximum
        (a lower bound of the norm): the first call therefore starts from the 2 -> 2 singular vectors and
        from ``restarts`` random vectors and keeps the best; later calls warm-start from it.
        """
        return super().power_iteration(max_iters=max_iters, rtol=rtol, atol=atol)

    def _run(
        self, w: Tensor, u: Tensor, v: Tensor, max_iters: int, rtol: float, atol: float, first: bool
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        if self._closed_form():
            return u, v, self._exact_norm(w), 0
        if not first or self._orders() == (2.0, 2.0):
            return self._iterate(self._power_step, w, u, v, max_iters, rtol, atol)
        u0, v0, _, iters = self._iterate(partial(LipschitzLayer._power_step, self), w, u, v, max_iters, rtol, atol)
        best = self._iterate(self._power_step, w, u0, v0, max_iters, rtol, atol)
        iters += best[3]
        for _ in range(self.restarts):
            candidate = self._iterate(self._power_step, w, torch.randn_like(u), v, max_iters, rtol, atol)
            iters += candidate[3]
            if float(candidate[2]) > float(best[2]):
                best = candidate
        return best[0], best[1], best[2], iters

    def sigma_hat(self) -> Tensor:
        """Differentiable (in W and in learned orders) lower bound ``||A(W) v||_q / ||v||_p`` of the
        induced norm (exact for p = 1 or q = inf), in float32 or higher with autocast off."""
        dt = self._iteration_dtype()
        with _no_autocast(self.weight.device):
            w = self.weight.to(dt)
            if self._closed_form():
                return self._exact_norm(w)
            p, q = self.domain, self.codomain
            if isinstance(p, Tensor):
                p, q = p.to(dt), q.to(dt)
            v = self.v.to(dt)
            return _lp_norm(self._op(v, w), q) / _lp_norm(v, p).clamp_min(_TINY)

    def extra_repr(self) -> str:
        p, q = self._orders()
        return super().extra_repr() + f", domain={p:.4g}, codomain={q:.4g}, learn_p={self.learn_p}"


class InducedNormLinear(_InducedNorm, _LipschitzLinear):
    """``y = W_hat x + b`` with ``||W_hat||_{p->q} <= coeff`` (p = ``domain``, q = ``codomain``).

    Parameters: ``weight``, ``bias`` (like ``nn.Linear``), plus ``raw_domain``/``raw_codomain`` only when
    ``learn_p=True``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.97,
        atol: float | None = None,
        rtol: float = 1e-3,
        max_iters: int = 200,
        zero_init: bool = False,
        domain: float = 2.0,
        codomain: float = 2.0,
        learn_p: bool = False,
    ):
        super().__init__(
            in_features,
            out_features,
            bias=bias,
            coeff=coeff,
            atol=atol,
            rtol=rtol,
            max_iters=max_iters,
            zero_init=zero_init,
        )
        self._setup_orders(domain, codomain, learn_p)

    def _max_column_norm(self, w: Tensor, r: float) -> Tensor:
        return torch.linalg.vector_norm(w, ord=r, dim=0).amax()

    def _max_row_norm(self, w: Tensor, r: float) -> Tensor:
        return torch.linalg.vector_norm(w, ord=r, dim=1).amax()


class InducedNormConv2d(_InducedNorm, _LipschitzConv2d):
    """``y = conv(x, W_hat) + b`` with the convolution's ``p -> q`` operator norm at ``input_size`` at most
    ``coeff`` (the true operator for ``kernel_size > 1``, the channel matrix for 1x1).

    Parameters: those of ``nn.Conv2d``, plus ``raw_domain``/``raw_codomain`` only when ``learn_p=True``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_size: Sequence[int] | None = None,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
        coeff: float = 0.97,
        atol: float | None = None,
        rtol: float = 1e-3,
        max_iters: int = 200,
        zero_init: bool = False,
        domain: float = 2.0,
        codomain: float = 2.0,
        learn_p: bool = False,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            input_size=input_size,
            stride=stride,
            padding=padding,
            bias=bias,
            coeff=coeff,
            atol=atol,
            rtol=rtol,
            max_iters=max_iters,
            zero_init=zero_init,
        )
        self._setup_orders(domain, codomain, learn_p)

    def _abs_kernel_power_max(self, w: Tensor, r: float, columns: bool) -> Tensor:
        """max over columns (input entries) or rows (output entries) of the r-norm of the operator's
        entries: every entry of A is one kernel tap or zero, so sum |A_ij|^r is a convolution of ones with
        |W|^r (transposed for columns); r = inf takes the largest tap that the operator actually uses."""
        ones_in = torch.ones(1, self.in_channels, *self.input_size, dtype=w.dtype, device=w.device)
        ones_out = torch.ones(1, self.out_channels, *self.output_size, dtype=w.dtype, device=w.device)
        a = w.abs()
        if math.isinf(r):
            used = torch.nn.grad.conv2d_weight(ones_in, w.shape, ones_out, self.stride, self.padding) > 0
            return (a * used).amax()
        m = a.amax().clamp_min(_TINY)
        k = (a / m) ** r
        sums = self._adj(ones_out, k) if columns else self._op(ones_in, k)
        return m * sums.amax() ** (1.0 / r)

    def _max_column_norm(self, w: Tensor, r: float) -> Tensor:
        if self._is_matrix:
            return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=r, dim=0).amax()
        return self._abs_kernel_power_max(w, r, columns=True)

    def _max_row_norm(self, w: Tensor, r: float) -> Tensor:
        if self._is_matrix:
            return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=r, dim=1).amax()
        return self._abs_kernel_power_max(w, r, columns=False)
