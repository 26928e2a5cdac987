"""Spectrally normalised linear and convolutional layers (i-ResNet, Behrmann et al. 2019; Residual Flows,
Chen et al. 2019): the layers whose Lipschitz constant stays below ``coeff < 1``.

A layer ``x -> A(W) x + b`` (a matrix, or a convolution seen as a linear operator at the layer's real input
resolution) uses the softly normalised weight

    W_hat = W / max(1, sigma_hat / coeff),        sigma_hat = |u^T A(W) v|,

where ``u``, ``v`` are unit vectors (buffers, no gradient; renormalised before use) from power iteration on
``A(W)``::

    v <- A^T u / ||A^T u||,   u <- A v / ||A v||,   sigma = u^T A v = ||A v||,

stopped when ``sigma * ||v_k - v_{k-1}||`` (to first order the residual ``||A^T u - sigma v||``) is at most
``atol + rtol * sigma``.  The iteration runs on a block of ``power_block`` (4) vectors with
Rayleigh-Ritz extraction (subspace iteration), so clustered top singular values, common in
convolutions, cost a few iterations instead of hundreds.  ``sigma_hat`` is a lower bound of
``||A(W)||_2`` that is tight at convergence, and
``||A(W_hat)||_2 = ||A(W)||_2 / max(1, sigma_hat / coeff) <= coeff`` up to the power-iteration error.
Weights whose norm is already below ``coeff`` pass through unchanged.  Gradients flow through
``sigma_hat`` (``d sigma_hat / dW = u v^T`` for a matrix), with ``u``, ``v`` held fixed.

The first estimate (from random ``u``, ``v``) comes from Golub-Kahan-Lanczos bidiagonalisation
(:func:`flowforge.nn.lanczos.top_singular_triplet`), run to the same tolerance: per product with ``A`` and
``A^T`` it is never below power iteration's estimate, and it converges in a few dozen steps where a block power
iteration from a random start can take hundreds on these clustered spectra.

The forward pass never changes ``u``, ``v`` (except for the very first call, which initialises them): call
:func:`update_lipschitz` after every optimiser step and before validation to refine them (warm-started
power iteration, usually a few iterations).  :func:`max_normalized_sigma` reports the largest effective
norm after normalisation.

The iteration runs in float32 (or the weight's precision if higher) with autocast off, and ``u``, ``v``,
``sigma``, ``initialized``, ``input_hw`` are kept in float32 or higher even when the module is cast to
bfloat16/float16, so mixed precision cannot corrupt the estimate.  All buffers are float tensors, so weight
averaging (EMA) can average and copy them, and they are only ever updated in place.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.checks import optional_positive_int
from flowforge.errors import ConfigError, ConvergenceError
from flowforge.nn.lanczos import top_singular_triplet
from flowforge.nn.version_cache import VersionCache

#: buffers that are kept at float32 or higher precision whatever the module is cast to
_STATE_BUFFERS = ("u", "v", "sigma", "initialized", "input_hw")
_TINY = 1e-30


def _no_autocast(device: torch.device):
    """A context that switches autocast off on ``device`` (our norm computations must stay in fp32); a no-op
    context when autocast is off there already (the common case, and the cheaper one in every forward)."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu") and (
        torch.compiler.is_compiling() or torch.is_autocast_enabled(device.type)
    ):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _normalize(x: Tensor, dim: int | None = None) -> Tensor:
    """``x / ||x||_2``, or each slice along ``dim`` by its own norm (zero stays zero; the power-iteration loop then
    keeps its previous vectors)."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=dim is not None).clamp_min(_TINY)


def _check_positive_int(name: str, value, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


class LipschitzLayer(nn.Module):
    """Base of the normalised layers: buffers, power-iteration loop, soft normalisation, forward.

    The operator ``A(W)`` is defined by subclasses through ``_op(x, w)`` (``A x``) and ``_adj(y, w)``
    (``A^T y``) on the shapes of ``v`` and ``u``; the norm (2 -> 2 here, mixed p -> q in
    :mod:`flowforge.nn.induced_norm`) through ``_power_step`` and ``sigma_hat``.
    """

    weight: Tensor
    bias: Tensor | None
    u: Tensor
    v: Tensor
    sigma: Tensor
    initialized: Tensor

    # ------------------------------------------------------------------ construction
    def _setup_normalisation(self, coeff, atol, rtol, max_iters, u_shape: Sequence[int], v_shape: Sequence[int]):
        name = type(self).__name__
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not 0.0 < float(coeff) < 1.0:
            raise ConfigError(
                f"{name}: coeff must be in (0, 1) for an invertible residual block, got {coeff!r}; it bounds the "
                "Lipschitz constant of the layer, and the residual branch g of x + g(x) needs Lip(g) < 1 "
                "(typical values 0.9 to 0.98)"
            )
        if atol is not None and not (isinstance(atol, (int, float)) and atol >= 0):
            raise ConfigError(f"{name}: atol must be None or a number >= 0, got {atol!r}")
        if not (isinstance(rtol, (int, float)) and rtol >= 0):
            raise ConfigError(f"{name}: rtol must be a number >= 0, got {rtol!r}")
        self.coeff = float(coeff)
        self.atol = None if atol is None else float(atol)
        self.rtol = float(rtol)
        self.max_iters = _check_positive_int("max_iters", max_iters, name)
        self.register_buffer("u", F.normalize(torch.randn(*u_shape).reshape(-1), dim=0).reshape(*u_shape))
        self.register_buffer("v", F.normalize(torch.randn(*v_shape).reshape(-1), dim=0).reshape(*v_shape))
        self.register_buffer("sigma", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros(()))
        self._ready = False
        self.register_load_state_dict_post_hook(_refresh_ready)

    def _init_parameters(self, zero_init: bool, fan_in: int) -> None:
        """``nn.Linear``/``nn.Conv2d`` initialisation, or (``zero_init``) a zero bias and a tiny weight
        ``U(-1e-3, 1e-3) / sqrt(fan_in)``: not exactly zero, so that power iteration stays well defined."""
        with torch.no_grad():
            if zero_init:
                bound = 1e-3 / math.sqrt(fan_in)
                self.weight.uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias.zero_()
            else:
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1.0 / math.sqrt(fan_in)
                    self.bias.uniform_(-bound, bound)

    def _apply(self, fn, recurse=True):
        # Casting the module (``.to(torch.bfloat16)``, ``.half()``) must not round the power-iteration state:
        # keep those buffers at float32 or higher (device moves still apply).
        before = {k: self._buffers[k] for k in _STATE_BUFFERS if self._buffers.get(k) is not None}
        out = super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers[key]
            if new.is_floating_point() and torch.finfo(new.dtype).bits < 32:
                dtype = old.dtype if torch.finfo(old.dtype).bits >= 32 else torch.float32
                self._buffers[key] = old.to(device=new.device, dtype=dtype)
        return out

    # ------------------------------------------------------------------ operator (subclasses)
    def _op(self, x: Tensor, w: Tensor) -> Tensor:  # A(w) x, x shaped like v
        raise NotImplementedError

    def _adj(self, y: Tensor, w: Tensor) -> Tensor:  # A(w)^T y, y shaped like u
        raise NotImplementedError

    def _adjoint_map(self, w: Tensor):  # y -> A(w)^T y, for many y (subclasses may prepare w once)
        return lambda y: self._adj(y, w)

    def _layer_map(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # the layer on a batch
        raise NotImplementedError

    # ------------------------------------------------------------------ norm (2 -> 2 here)
    def _power_step(self, u: Tensor, v: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v = _normalize(self._adj(u, w))
        y = self._op(v, w)
        sigma = torch.linalg.vector_norm(y)
        return y / sigma.clamp_min(_TINY), v, sigma

    #: ``M(u, v)`` of :meth:`sigma_hat`, valid while ``u`` and ``v`` are unchanged
    _sigma_direction_cache = VersionCache()

    def _sigma_direction(self, u: Tensor, v: Tensor) -> Tensor:
        """``M`` with ``<W, M> = u^T A(W) v`` for every ``W`` (``u^T A(W) v`` is linear in ``W``): for a matrix
        ``u v^T``, shaped like the weight."""
        return torch.outer(u.reshape(-1), v.reshape(-1)).reshape(self.weight.shape)

    def sigma_hat(self) -> Tensor:
        """Differentiable estimate ``|u^T A(W) v|`` of the norm of the raw weight (u, v fixed; computed in
        float32 or higher with autocast off).  ``u``/``v`` are renormalised first, so averaged (EMA) copies
        that drifted off the unit sphere still give a lower bound of the norm.

        ``u^T A(W) v = <W, M(u, v)>`` is linear in ``W``: ``M`` is computed once per power-iteration update
        (keyed by the buffers' identity and version counters, so in-place updates refresh it; writes through
        ``.data``, as weight averaging swaps, need :meth:`forget_sigma_direction`), and every forward then costs
        one elementwise product and a sum.  Under ``torch.compile``
        ``u^T A(W) v`` is traced directly (a compiled graph cannot key a cache on buffer versions)."""
        if torch.compiler.is_compiling():
            dt = self._iteration_dtype()
            with _no_autocast(self.weight.device):
                u, v = _normalize(self.u.to(dt)), _normalize(self.v.to(dt))
                return (u * self._op(v, self.weight.to(dt))).sum().abs()

        m = self.sigma_direction()  # in the iteration's precision
        with _no_autocast(self.weight.device):
            return (self.weight.to(m.dtype) * m).sum().abs()

    def sigma_direction(self) -> Tensor:
        """``M`` (no gradient, shaped like the weight, in the iteration's precision) with
        ``sigma_hat = |<W, M>|``, from the current ``u``, ``v``; cached until they change (:meth:`sigma_hat`)."""
        dt = self._iteration_dtype()

        def direction() -> Tensor:
            with torch.no_grad(), _no_autocast(self.weight.device):
                return self._sigma_direction(_normalize(self.u.to(dt)), _normalize(self.v.to(dt)))

        return self._sigma_direction_cache.get_or_compute((self.u, self.v), direction, extra=dt)

    # ------------------------------------------------------------------ public API
    def _iteration_dtype(self) -> torch.dtype:
        wt, ut = self.weight.dtype, self.u.dtype
        if wt == ut and wt in (torch.float32, torch.float64):  # the common case, without a dispatched op
            return wt
        return torch.promote_types(torch.promote_types(wt, torch.float32), ut)

    def _is_initialized(self) -> bool:
        """Whether ``u``, ``v`` have been through a power iteration: a Python flag mirroring the
        ``initialized`` buffer (set by the power iteration, refreshed from the buffer by ``load_state_dict``),
        so the forward never reads a tensor on the host."""
        return self._ready

    def _mark_initialized(self) -> None:
        self.initialized.fill_(1.0)
        self._ready = True

    def _ensure_initialized(self) -> None:
        if self._is_initialized():
            return
        try:
            self.power_iteration()
        except RuntimeError as err:
            if "transform" not in str(err):
                raise
            raise ConfigError(
                f"{type(self).__name__} is not initialised and cannot initialise its power-iteration buffers inside "
                "a torch.func transform (in-place update of a captured buffer); call update_lipschitz(model) or run "
                "one ordinary forward pass first"
            ) from err

    @torch.no_grad()
    def power_iteration(
        self, max_iters: int | None = None, rtol: float | None = None, atol: float | None = None
    ) -> int:
        """Refine ``u``, ``v`` and ``sigma`` by warm-started power iteration; return the iterations run.

        Stops when ``sigma * ||v_k - v_{k-1}|| <= atol + rtol * sigma`` or after ``max_iters`` (defaults: the
        constructor's; ``atol=None`` means 0).  For the spectral norm ``sigma * ||v_k - v_{k-1}||`` is, to first
        order, the residual ``||A^T u - sigma v||`` of the singular-pair equations: a small residual puts
        ``sigma`` close to a singular value even when the top singular values cluster (as they do for
        convolutions), whereas the change of ``sigma`` itself is only of order residual^2 / sigma there, so the
        plain test ``|s_k - s_{k-1}| <= atol + rtol * s_k`` (implied by this one) stops far from the limit.  Like
        any power method it can still rest near a singular value just below the top one when the two nearly
        coincide; the error is then at most their gap.  With ``power_block > 1`` this is the block power
        iteration of :func:`update_lipschitz` on a group of one layer.
        A warm-started call on an unchanged weight stops after one iteration.  The first call on an
        uninitialised layer (random ``u``, ``v``) runs Golub-Kahan-Lanczos (spectral norm; the induced norms their
        own method) for up to ``max(max_iters, 200)`` steps (``init_iters`` steps when set) and sets
        ``initialized``.  Buffers are updated in
        place.  Raises
        :class:`~flowforge.errors.ConvergenceError` when the weight is not finite.
        """
        max_iters, rtol, atol = self._settings(max_iters, rtol, atol, type(self).__name__)
        if not self._is_initialized() and self.lanczos_init:
            return self._lanczos(self.init_iters or max(max_iters, 200), rtol, atol)
        if self._subspace_shape()[0] > 1:
            return _block_power_iteration([self], max_iters, rtol, atol)
        first = not self._is_initialized()
        if first:
            max_iters = max(max_iters, 200)
        dt = self._iteration_dtype()
        with _no_autocast(self.weight.device):
            w = self.weight.detach().to(dt)
            u, v, sigma, iters = self._run(w, self.u.to(dt), self.v.to(dt), max_iters, rtol, atol, first)
        self.u.copy_(u)
        self.v.copy_(v)
        self.sigma.copy_(sigma)
        self._mark_initialized()
        return iters

    def _settings(self, max_iters, rtol, atol, owner: str) -> tuple[int, float, float]:
        """``(max_iters, rtol, atol)`` of one power iteration: the given values, else the constructor's
        (``atol=None`` means 0)."""
        max_iters = self.max_iters if max_iters is None else _check_positive_int("max_iters", max_iters, owner)
        rtol = self.rtol if rtol is None else float(rtol)
        atol = (self.atol if atol is None else float(atol)) or 0.0
        return max_iters, rtol, atol

    #: width of the subspace iterated by :func:`_block_power_iteration` (1 = plain power iteration)
    power_block = 4
    #: whether the first estimate comes from :meth:`_lanczos` (the 2 -> 2 norm only)
    lanczos_init = True
    #: cap on the first estimate's Lanczos steps (None: to tolerance, at most ``max(max_iters, 200)``); see
    #: :func:`set_init_iters`
    init_iters: int | None = None

    @torch.no_grad()
    def _lanczos(self, max_iters: int, rtol: float, atol: float) -> int:
        """Golub-Kahan-Lanczos from the current ``v`` (module docstring) for at most ``max_iters`` steps; returns
        the steps run.  The first estimate (from the random ``v``) and ``method="krylov"`` updates of
        :func:`update_lipschitz`; its leading right Ritz vectors, when there are as many as the block power
        iteration's subspace holds (or on the first estimate, completed as a rebuilt subspace would be), become that
        iteration's warm subspace."""
        dt = self._iteration_dtype()
        first = not self._is_initialized()
        with _no_autocast(self.weight.device):
            w = self.weight.detach().to(dt)
            vshape, ushape = self.v.shape, self.u.shape
            adjoint = self._adjoint_map(w)
            try:
                t = top_singular_triplet(
                    lambda x: self._op(x.reshape(vshape), w).reshape(-1),
                    lambda y: adjoint(y.reshape(ushape)).reshape(-1),
                    self.v.to(dt).reshape(-1),
                    max_iters,
                    rtol,
                    atol,
                    num_ritz=self._subspace_shape()[0],
                )
            except FloatingPointError as err:
                raise _non_finite(self, err) from None
        if float(t.sigma) > _TINY:  # a zero weight keeps the unit vectors it had
            self.u.copy_(t.u.reshape(ushape))
            self.v.copy_(t.v.reshape(vshape))
        self.sigma.copy_(t.sigma)
        self._mark_initialized()
        self.power_converged = t.converged
        k, *vshape = self._subspace_shape()
        if k > 1 and float(t.sigma) > _TINY and t.right_ritz is not None:  # a block iteration continues from here
            basis = t.right_ritz
            if basis.shape[0] < k and first:  # a short Krylov space: complete it as a rebuilt subspace would be
                basis = torch.cat([basis, self._warm_basis(dt).reshape(k, -1)[basis.shape[0] :]])
            if basis.shape[0] == k:  # (a short one of a krylov update: the block iteration rebuilds it when it runs)
                self._subspace_cache.put((self.v,), basis.reshape(k, *vshape))
        return t.iters

    #: whether the latest power iteration met its stopping test (False: it stopped at ``max_iters``)
    power_converged = True
    #: the subspace of the latest block power iteration, valid while ``v`` is the one it ended with
    _subspace_cache = VersionCache()

    def _run(
        self, w: Tensor, u: Tensor, v: Tensor, max_iters: int, rtol: float, atol: float, first: bool
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """The whole estimate from the current ``u``, ``v`` by plain power iteration, for a subspace of width 1
        (overridden by the induced-norm layers)."""
        return self._iterate(self._power_step, w, u, v, max_iters, rtol, atol)

    def _subspace_shape(self) -> tuple[int, ...]:
        """Shape ``(k, *vector)`` of the subspace basis: k vectors shaped like ``v`` (without a conv batch dim)."""
        vshape = self.v.shape[1:] if self.v.dim() == 4 else self.v.shape
        return (min(self.power_block, self.u.numel(), self.v.numel()), *vshape)

    def subspace_state(self) -> Tensor | None:
        """The warm-start basis of the block power iteration, shaped ``(k, *v_shape)``, or None.

        The subspace iterated by the block power iteration is kept between calls outside the state dict (it
        is not needed to evaluate the layer).  It is returned only while it belongs to the current ``v``: any
        change of ``v`` (a new power iteration, loading a state dict, weight averaging, a device move) makes it
        stale, and the next iteration rebuilds it from ``v``.  Save it with the model's state to resume a run
        with exactly the iterations an uninterrupted one would take; restore it with
        :meth:`load_subspace_state` after the state dict has been loaded.
        """
        basis = self._subspace_cache.get((self.v,))
        if basis is None or tuple(basis.shape) != self._subspace_shape():
            return None
        return basis

    def forget_sigma_direction(self) -> None:
        """Drop the cached ``M(u, v)`` of :meth:`sigma_hat`.  The cache notices in-place updates through the
        buffers' version counters, but not writes through ``.data`` (which weight averaging uses to swap weights
        and buffers in and out): call this after such a swap."""
        self.__dict__.pop("_sigma_direction_cache", None)

    def forget_subspace(self) -> None:
        """Drop the stored subspace: the next block power iteration rebuilds it from ``v``."""
        self.__dict__.pop("_subspace_cache", None)

    def load_subspace_state(self, basis: Tensor) -> None:
        """Install ``basis`` (from :meth:`subspace_state`) as the warm start of the next block power iteration.

        Call it after the state dict has been loaded: the basis belongs to the ``v`` it was saved with.  It is
        moved to ``v``'s device and to the precision of the iteration; a basis of another shape raises
        :class:`~flowforge.errors.ConfigError`.
        """
        expected = self._subspace_shape()
        if not isinstance(basis, Tensor) or tuple(basis.shape) != expected:
            got = tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__
            raise ConfigError(
                f"{type(self).__name__}: a power-iteration subspace must have shape {expected} (power_block "
                f"vectors shaped like v), got {got}; was it saved from a layer of another size?"
            )
        basis = basis.detach().to(device=self.v.device, dtype=self._iteration_dtype())
        self._subspace_cache.put((self.v,), basis)

    def _warm_basis(self, dt: torch.dtype) -> Tensor:
        """The basis the next block power iteration starts from: the stored subspace while it belongs to the
        current ``v``, else ``v`` completed by ``k - 1`` vectors of a fixed-seed draw."""
        basis = self.subspace_state()
        if basis is not None and basis.dtype == dt:
            return basis
        k, *vshape = self._subspace_shape()
        gen = torch.Generator(device=self.v.device).manual_seed(0)
        extra = torch.randn((k - 1, *vshape), generator=gen, device=self.v.device, dtype=dt)
        return torch.cat([self.v.to(dt).reshape(1, *vshape), extra])

    def _iterate(
        self, step, w: Tensor, u: Tensor, v: Tensor, max_iters: int, rtol: float, atol: float
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """Apply ``step(u, v, w) -> (u, v, sigma)`` until ``sigma * ||dv|| / ||v|| <= atol + rtol * sigma``."""
        iters = 0
        sigma = torch.zeros((), dtype=w.dtype, device=w.device)
        self.power_converged = False
        for iters in range(1, max_iters + 1):  # noqa: B007 (the count is returned)
            u_old, v_old = u, v
            u, v, sigma = step(u, v, w)
            moved = torch.linalg.vector_norm(v - v_old) / torch.linalg.vector_norm(v).clamp_min(_TINY)
            s, moved = torch.stack([sigma, moved.to(sigma.dtype)]).tolist()  # one device sync per iteration
            if not math.isfinite(s):
                raise _non_finite(self, s)
            if s <= _TINY:  # zero weight (or u orthogonal to its range): keep the unit vectors we had
                u, v = u_old, v_old
                self.power_converged = True
                break
            if s * moved <= atol + rtol * s:
                self.power_converged = True
                break
        return u, v, sigma, iters

    def normalized_weight(self) -> Tensor:
        """``W / max(1, sigma_hat / coeff)``, differentiable w.r.t. ``W`` (through ``sigma_hat`` as well)."""
        self._ensure_initialized()
        factor = torch.clamp(self.sigma_hat() / self.coeff, min=1.0)
        w = self.weight
        return (w.to(factor.dtype) / factor).to(w.dtype)

    def normalization_parts(self) -> tuple[Tensor, Tensor] | None:
        """``(W, M)`` with ``normalized_weight() = W / max(1, |<W, M>| / coeff)`` (``M`` from
        :meth:`sigma_direction`, no gradient), for code that applies the normalisation and its derivative
        itself; ``None`` when the weight is not in the iteration's precision (the normalisation then casts)."""
        self._ensure_initialized()
        m = self.sigma_direction()
        return (self.weight, m) if m.dtype == self.weight.dtype else None

    def normalized_sigma(self) -> float:
        """The effective norm estimate after normalisation, ``sigma_hat / max(1, sigma_hat / coeff)``."""
        self._ensure_initialized()
        with torch.no_grad():
            s = float(self.sigma_hat())
        return s / max(1.0, s / self.coeff)

    def forward(self, x: Tensor) -> Tensor:
        return self._layer_map(x, self.normalized_weight(), self.bias)

    def linear_part(self, v: Tensor) -> Tensor:
        """The layer without its bias, ``A(W_hat) v``: its Jacobian-vector product (differentiable in W)."""
        return self._layer_map(v, self.normalized_weight(), None)


class _LipschitzLinear(LipschitzLayer):
    """Geometry of a dense layer ``y = W_hat x + b``: ``A(W) = W`` with ``u`` (out,), ``v`` (in,)."""

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
    ):
        super().__init__()
        name = type(self).__name__
        self.in_features = _check_positive_int("in_features", in_features, name)
        self.out_features = _check_positive_int("out_features", out_features, name)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._init_parameters(zero_init, in_features)
        self._setup_normalisation(coeff, atol, rtol, max_iters, (out_features,), (in_features,))

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        return w @ x

    def _adj(self, y: Tensor, w: Tensor) -> Tensor:
        return w.t() @ y

    def _layer_map(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, coeff={self.coeff}"
        )


class _LipschitzConv2d(LipschitzLayer):
    """Geometry of a convolution ``y = conv(x, W_hat) + b`` at a fixed input size ``(H, W)``.

    ``kernel_size == 1``: ``A(W)`` is the (out, in) channel-mixing matrix (its norm is the operator norm at
    any resolution).  ``kernel_size > 1``: ``A(W)`` is the true convolution operator on
    ``(1, in, H, W)`` inputs (zero padding included), ``A^T`` its transposed convolution.
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
    ):
        super().__init__()
        name = type(self).__name__
        self.in_channels = _check_positive_int("in_channels", in_channels, name)
        self.out_channels = _check_positive_int("out_channels", out_channels, name)
        self.kernel_size = _check_positive_int("kernel_size", kernel_size, name)
        self.stride = _check_positive_int("stride", stride, name)
        padding = kernel_size // 2 if padding is None else padding
        if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding < kernel_size:
            raise ConfigError(
                f"{name}: padding must be an integer in [0, kernel_size - 1] = [0, {kernel_size - 1}], got {padding!r}"
            )
        self.padding = padding
        if input_size is not None:
            if (
                not isinstance(input_size, (tuple, list))
                or len(input_size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_size)
            ):
                raise ConfigError(f"{name}: input_size must be a pair (H, W) of positive integers, got {input_size!r}")
            input_size = (int(input_size[0]), int(input_size[1]))
        elif kernel_size > 1:
            raise ConfigError(
                f"{name}: input_size=(H, W) is required for kernel_size={kernel_size} > 1: the norm of a convolution "
                "depends on the input resolution, and power iteration runs on the operator at that size; pass "
                "input_size=(H, W) of the feature map this layer sees"
            )
        self.input_size = input_size
        self.output_size = None
        self._output_padding = (0, 0)
        if input_size is not None:
            out = tuple((s + 2 * padding - kernel_size) // self.stride + 1 for s in input_size)
            if min(out) < 1:
                raise ConfigError(
                    f"{name}: input_size={input_size} is smaller than the kernel ({kernel_size}, "
                    f"padding {padding}): the output would be empty"
                )
            self.output_size = out
            self._output_padding = tuple(
                s - ((o - 1) * self.stride - 2 * padding + kernel_size) for s, o in zip(input_size, out)
            )
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._init_parameters(zero_init, in_channels * kernel_size * kernel_size)
        if kernel_size == 1:
            u_shape, v_shape = (out_channels,), (in_channels,)
        else:
            u_shape, v_shape = (1, out_channels, *self.output_size), (1, in_channels, *input_size)
        self._setup_normalisation(coeff, atol, rtol, max_iters, u_shape, v_shape)
        self.register_buffer(
            "input_hw", torch.tensor(input_size if input_size is not None else (0, 0), dtype=torch.float32)
        )

    @property
    def _is_matrix(self) -> bool:
        return self.kernel_size == 1

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        if self._is_matrix:
            return w.reshape(w.shape[0], -1) @ x
        return F.conv2d(x, w, None, self.stride, self.padding)

    def _adj(self, y: Tensor, w: Tensor) -> Tensor:
        return self._adjoint_map(w)(y)

    def _adjoint_map(self, w: Tensor):
        """``y -> A(w)^T y`` with the kernel prepared once (:func:`conv_adjoint_map`)."""
        if self._is_matrix:
            wt = w.reshape(w.shape[0], -1).t()
            return lambda y: wt @ y
        return conv_adjoint_map(w, self.stride, self.padding, self._output_padding)

    def _sigma_direction(self, u: Tensor, v: Tensor) -> Tensor:
        """For k x k kernels ``<u, conv(v, W)> = <W, M(u, v)>`` with ``M`` the weight gradient of the
        convolution at (v, u)."""
        if self._is_matrix:
            return super()._sigma_direction(u, v)
        return torch.nn.grad.conv2d_weight(v, self.weight.shape, u, self.stride, self.padding)

    def _layer_map(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            raise ConfigError(
                f"{type(self).__name__} was built for inputs of spatial size {self.input_size} (its norm is "
                f"controlled at that resolution) but got spatial size {tuple(x.shape[-2:])}; construct it with "
                f"input_size={tuple(x.shape[-2:])}"
            )
        return F.conv2d(x, w, b, self.stride, self.padding)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        saved = state_dict.get(prefix + "input_hw")
        if saved is not None and not torch.equal(saved.to(self.input_hw), self.input_hw):
            raise ConfigError(
                f"{type(self).__name__}: checkpoint was saved for input size "
                f"{tuple(int(s) for s in saved.tolist())} but this layer is configured for "
                f"{tuple(int(s) for s in self.input_hw.tolist())} (0, 0 = any); build it with the same input_size"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, input_size={self.input_size}, bias={self.bias is not None}, "
            f"coeff={self.coeff}"
        )


class SpectralNormLinear(_LipschitzLinear):
    """``y = W_hat x + b`` with ``||W_hat||_2 <= coeff`` (soft spectral normalisation, see module docstring).

    Parameters are exactly ``weight`` (out, in) and ``bias`` (out), initialised like ``nn.Linear``.
    """


class SpectralNormConv2d(_LipschitzConv2d):
    """``y = conv(x, W_hat) + b`` with the convolution operator norm at ``input_size`` at most ``coeff``.

    Parameters are exactly those of ``nn.Conv2d`` (``weight`` (out, in, k, k), ``bias`` (out)).  For
    ``kernel_size > 1`` the norm is that of the true operator on ``(in, H, W)`` inputs with zero padding
    (not the norm of the reshaped kernel), so ``input_size=(H, W)`` is required and checked in forward.
    """


# ---------------------------------------------------------------------------------------------- helpers
def _non_finite(layer: nn.Module, estimate) -> ConvergenceError:
    """The error of a power iteration whose norm estimate came out NaN/inf."""
    return ConvergenceError(
        f"{type(layer).__name__}: power iteration produced a non-finite norm estimate ({estimate}); the weight "
        "contains NaN/inf values (lower the learning rate or check the loss)"
    )


def conv_adjoint_map(w: Tensor, stride: int, padding: int, output_padding=(0, 0), groups: int = 1):
    """``y -> conv_transpose2d(y, w, stride, padding, output_padding, groups)``, the adjoint of
    ``x -> conv2d(x, w, stride, padding, groups)``.  At stride 1 it is the convolution with the flipped kernel whose
    input and output channels are swapped within each group, padded by ``k - 1 - padding``: the same operator, and
    on CPUs several times faster than ``conv_transpose2d`` when one side has few channels."""
    if stride != 1:
        return lambda y: F.conv_transpose2d(y, w, None, stride, padding, output_padding, groups)
    out_c, in_c, kh, kw = w.shape
    flipped = (
        w.reshape(groups, out_c // groups, in_c, kh, kw)
        .transpose(1, 2)
        .flip(-2, -1)
        .reshape(groups * in_c, out_c // groups, kh, kw)
        .contiguous()
    )
    pad = (kh - 1 - padding, kw - 1 - padding)
    return lambda y: F.conv2d(y, flipped, None, 1, pad, 1, groups)


def _refresh_ready(module: LipschitzLayer, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: mirror the loaded ``initialized`` buffer into the Python flag (one host
    read per load; weight averaging may average the 0/1 flag, hence the threshold)."""
    module._ready = float(module.initialized) >= 0.5  # host sync: once per load, outside any training step


def lipschitz_layers(module: nn.Module) -> list[nn.Module]:
    """All submodules (``module`` included) that carry a ``power_iteration`` method."""
    return [m for m in module.modules() if callable(getattr(type(m), "power_iteration", None))]  # a class lookup


def _group_key(layer: nn.Module):
    """Layers that can share one batched subspace iteration: plain spectral norm, same geometry."""
    if type(layer) not in (SpectralNormLinear, SpectralNormConv2d) or layer.power_block < 2:
        return None
    w = layer.weight
    conv = isinstance(layer, _LipschitzConv2d) and not layer._is_matrix
    geometry = ("conv", layer.input_size, layer.stride, layer.padding, layer._output_padding) if conv else ("matrix",)
    return (
        geometry,
        tuple(w.shape),
        w.dtype,
        w.device,
        layer.rtol,
        layer.atol,
        layer.max_iters,
        layer.power_block,
        layer._is_initialized(),
    )


@torch.no_grad()
def _block_power_iteration(layers: list[LipschitzLayer], max_iters: int, rtol: float, atol: float) -> int:
    """Block power iteration of G >= 1 spectral-norm layers of one geometry at once; returns the iterations run.

    Subspace iteration with Rayleigh-Ritz extraction (block power method on ``A^T A``): ``V`` holds k
    orthonormal right vectors (the first one ``v``); each iteration ``V <- orth(A^T A V)``, ``Y = A V``, and the
    Ritz pair from the k x k Gram matrix ``Y Y^T`` gives ``sigma`` (its largest eigenvalue's root),
    ``v = V^T y`` and ``u = Y^T y / sigma``.  The top Ritz vector converges at rate
    ``(sigma_{k+1} / sigma_1)^2`` instead of plain power iteration's ``(sigma_2 / sigma_1)^2``, which matters
    because the top singular values of these layers (convolutions above all) cluster.  The subspace is
    refreshed with the current weight before each test, so the test never compares two Ritz vectors of a stale
    subspace (which would stop below a newly dominant direction).  Each layer stops being tested once
    ``sigma * ||v_k - v_{k-1}|| <= atol + rtol * sigma`` (see :meth:`LipschitzLayer.power_iteration`); the
    group iterates until all pass (more iterations only refine the others), with one device synchronisation
    per iteration.  The other k - 1 vectors are kept between calls (:meth:`LipschitzLayer.subspace_state`;
    rebuilt from ``v`` and a fixed-seed draw when missing).

    The G operators are applied together: stacked matrices with batched products, or convolutions as one
    grouped convolution; QR and the k x k eigenproblems are batched.  (:func:`update_lipschitz` initialises
    uninitialised layers by :meth:`LipschitzLayer._lanczos_initialisation` instead; called on them directly,
    this runs up to ``max(max_iters, 200)`` iterations.)
    """
    first, g = layers[0], len(layers)
    if not first._is_initialized():
        max_iters = max(max_iters, 200)
    dt = first._iteration_dtype()
    k, *vshape = first._subspace_shape()
    conv = isinstance(first, _LipschitzConv2d) and not first._is_matrix
    with _no_autocast(first.weight.device):
        w = torch.stack([layer.weight.detach().to(dt) for layer in layers])
        if conv:
            out_c, in_c, kh, kw = first.weight.shape
            wc = w.reshape(g * out_c, in_c, kh, kw)

            def op(b):  # (g, k, C, H, W) -> (g, k, O, H', W')
                y = F.conv2d(
                    b.transpose(0, 1).reshape(k, g * in_c, *vshape[1:]), wc, None, first.stride, first.padding, 1, g
                )
                return y.reshape(k, g, out_c, *y.shape[-2:]).transpose(0, 1)

            adjoint = conv_adjoint_map(wc, first.stride, first.padding, first._output_padding, g)

            def adj(y):
                x = adjoint(y.transpose(0, 1).reshape(k, g * out_c, *y.shape[-2:]))
                return x.reshape(k, g, in_c, *x.shape[-2:]).transpose(0, 1)
        else:
            wm = w.reshape(g, w.shape[1], -1)

            def op(b):  # (g, k, in) -> (g, k, out)
                return torch.bmm(b, wm.transpose(1, 2))

            def adj(y):
                return torch.bmm(y, wm)

        basis = torch.stack([layer._warm_basis(dt) for layer in layers])  # (g, k, *vshape)
        v_prev = torch.stack([_normalize(layer.v.to(dt).reshape(-1)) for layer in layers])
        y = op(basis)
        iters = 0
        converged = torch.zeros(g, dtype=torch.bool, device=w.device)  # latched: a layer that passed stays passed
        for iters in range(1, max_iters + 1):  # noqa: B007 (the count is returned)
            z = adj(y).reshape(g, k, -1)
            basis = torch.linalg.qr(z.transpose(1, 2))[0].transpose(1, 2).reshape(g, k, *vshape)
            y = op(basis)
            yf = y.reshape(g, k, -1)
            evals, evecs = torch.linalg.eigh(yf @ yf.transpose(1, 2))
            sigma = evals[:, -1].clamp_min(0).sqrt()
            top = evecs[:, :, -1]  # (g, k)
            v_new = torch.einsum("gk,gkn->gn", top, basis.reshape(g, k, -1))
            sign = torch.sign((v_new * v_prev).sum(1, keepdim=True) + _TINY)  # eigenvectors have no sign: keep v's
            top, v_new = top * sign, v_new * sign
            moved = torch.linalg.vector_norm(v_new - v_prev, dim=1)
            done = (sigma * moved <= atol + rtol * sigma) | (sigma <= _TINY)  # zero weight: nothing to refine
            converged = converged | done
            sigmas, passed = torch.stack([sigma, converged.to(sigma.dtype)]).tolist()  # one device sync per iteration
            bad = [(layer, s_) for layer, s_ in zip(layers, sigmas) if not math.isfinite(s_)]
            if bad:
                raise _non_finite(*bad[0])
            v_prev = v_new
            if all(passed):
                break
        u_new = torch.einsum("gk,gkn->gn", top, yf) / sigma.clamp_min(_TINY)[:, None]
    for i, layer in enumerate(layers):
        if sigmas[i] > _TINY:  # a zero weight keeps the unit vectors it had
            layer.u.copy_(u_new[i].reshape(layer.u.shape))
            layer.v.copy_(v_new[i].reshape(layer.v.shape))
        layer.sigma.copy_(sigma[i])
        layer._mark_initialized()
        layer.power_converged = bool(passed[i])
        layer._subspace_cache.put((layer.v,), basis[i])
    if not conv:  # sigma_hat's direction M = u v^T of every updated layer, computed for the group at once
        directions = torch.bmm(_normalize(u_new, 1).unsqueeze(2), _normalize(v_new, 1).unsqueeze(1))
        for i, layer in enumerate(layers):
            if sigmas[i] > _TINY and layer.u.dtype == dt and layer.v.dtype == dt:
                layer._sigma_direction_cache.put((layer.u, layer.v), directions[i].view(layer.weight.shape), extra=dt)
    return iters


def check_init_iters(init_iters) -> int | None:
    """``init_iters`` when it is None or a positive integer; a :class:`ConfigError` otherwise."""
    return optional_positive_int("lipschitz_init_iters", init_iters)


def set_init_iters(module: nn.Module, init_iters: int | None) -> int:
    """Cap the first estimate of every spectral-norm layer of ``module`` at ``init_iters`` Lanczos steps (None: to
    tolerance); returns the number of layers set.

    A capped first estimate is a Ritz value, a lower bound on the norm, so until later updates refine it a
    normalised weight may exceed ``coeff`` by the estimate's error.  ``k`` Lanczos steps cost ``k`` power-iteration
    steps, and their estimate is never below that of ``k`` power-iteration steps from the same start."""
    init_iters = check_init_iters(init_iters)
    layers = [m for m in lipschitz_layers(module) if getattr(m, "lanczos_init", False)]
    for layer in layers:
        layer.init_iters = init_iters
    return len(layers)


#: the warm-started updates :func:`update_lipschitz` can run on the spectral-norm layers
UPDATE_METHODS = ("subspace", "krylov")


@torch.no_grad()
def update_lipschitz(
    module: nn.Module, max_iters: int | None = None, rtol: float | None = None, method: str = "subspace"
) -> dict:
    """Run power iteration on every normalised layer (after each optimiser step, before validation).

    ``method="subspace"`` (the default): spectral-norm layers of the same geometry run the block power iteration
    together (one batched product or grouped convolution per iteration for the whole group); the others one by
    one.  ``method="krylov"``: each spectral-norm layer runs Golub-Kahan-Lanczos from its ``v`` (one step costs
    what one plain power-iteration step costs, and with ``max_iters=1`` it is that step: the per-step update of
    the official Residual Flows code), without a subspace carried between calls.  Uninitialised layers get
    their first estimate by Lanczos either way; induced-norm layers always run their own method.
    Returns ``{"max_sigma": largest raw-weight norm estimate (before normalisation), "power_iterations": most
    iterations any layer needed, "num_layers": n, "unconverged": names of the layers whose iteration stopped at its
    cap before meeting its tolerance}``, or ``{}`` when ``module`` has no such layer.
    """
    if method not in UPDATE_METHODS:
        raise ConfigError(f"update_lipschitz: method must be one of {', '.join(UPDATE_METHODS)}, got {method!r}")
    layers = lipschitz_layers(module)
    if not layers:
        return {}
    groups: dict = {}
    iters = []
    for layer in layers:
        key = _group_key(layer)
        if method == "krylov" and getattr(layer, "lanczos_init", False) and layer._is_initialized():
            settings = layer._settings(max_iters, rtol, None, "update_lipschitz")
            iters.append(layer._lanczos(*settings))
        elif key is None:
            iters.append(layer.power_iteration(max_iters=max_iters, rtol=rtol))
        else:
            groups.setdefault(key, []).append(layer)
    for group in groups.values():
        if len(group) == 1 or not group[0]._is_initialized():  # (the first estimate: Lanczos, layer by layer)
            iters.extend(layer.power_iteration(max_iters=max_iters, rtol=rtol) for layer in group)
        else:
            settings = group[0]._settings(max_iters, rtol, None, "update_lipschitz")
            iters.append(_block_power_iteration(group, *settings))
    unconverged = [layer for layer in layers if not layer.power_converged]
    if unconverged:
        names = {id(m): name for name, m in module.named_modules()}
        unconverged = [names[id(layer)] for layer in unconverged]
    return {
        "max_sigma": max(float(layer.sigma) for layer in layers),
        "power_iterations": int(max(iters)),
        "num_layers": len(layers),
        "unconverged": unconverged,
    }


def max_normalized_sigma(module: nn.Module) -> float:
    """Largest ``sigma_hat / max(1, sigma_hat / coeff)`` over the normalised layers (``<= coeff`` each);
    0.0 when there are none."""
    return max((layer.normalized_sigma() for layer in lipschitz_layers(module)), default=0.0)
