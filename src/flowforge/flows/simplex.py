"""Calibration transforms: flows on the open probability simplex {p in R^n : p_i > 0, sum_i p_i = 1}.

* calibration ``f(p) = softmax(a log p + b)``, ``a > 0`` scalar, ``b`` in R^n with gauge ``b_n = 0``::

      R(p) = a^(n-1) prod_i q_i / p_i,   q = f(p);      f^{-1}(q) = softmax((log q - b) / a)

* generalised calibration ``f(p) = softmax(A log p + b)``, ``A`` with ``A 1 = lambda 1``::

      R(p) = |det B| prod_i q_i / p_i,   B = V^T A V,   |det A| = |lambda| |det B|
      f^{-1}(q) = softmax(V B^{-1} V^T (log q - b))

  where ``V`` (n x (n-1)) is an orthonormal basis of ``1^perp`` (the Helmert contrasts).

``R`` is the differential volume ratio of the flat simplex (tangent space ``{v : sum v = 0}``, the
same (n-1)-dimensional Lebesgue measure on both sides, so any constant chart factor cancels).

Derivation.  Use the additive log-ratio chart ``y_i = log(p_i / p_n)`` (i < n).  Its inverse
``p = softmax([y, 0])`` has Jacobian ``d p_{1:n-1} / d y = diag(p') - p' p'^T`` (``p' = p_{1:n-1}``)
whose determinant is ``prod_{i<n} p_i (1 - sum_{i<n} p_i) = prod_i p_i``; the simplex volume element
is ``sqrt(n) d p_{1:n-1} = sqrt(n) prod_i p_i d y``.  In this chart the calibration is affine,
``y' = a y + (b_{1:n-1} - b_n)``, with Jacobian determinant ``a^(n-1)``; hence
``R = a^(n-1) prod q / prod p``.  The same argument in the orthonormal (isometric log-ratio) chart
``s = V^T log p`` (a fixed linear change of the alr chart, so volume elements stay ``c prod p ds``)
covers the generalised form: ``s' = V^T (A log p + b)``.

Which part of ``A`` matters: ``log p`` is known on the simplex, but ``softmax`` forgets shifts along
``1``, so ``f`` only sees ``V^T A log p``.  Writing ``log p = V s + m 1`` (``m`` the mean of ``log p``),
``V^T A log p = (V^T A V) s + m V^T A 1``; ``m`` is a nonlinear function of ``s``, so ``f`` is an affine
(hence invertible) map of the log-ratio coordinates exactly when ``V^T A 1 = 0``, i.e. ``1`` is an
eigenvector of ``A``.  Then only ``B = V^T A V`` acts (any ``1 w^T`` term and ``lambda`` drop out), and
``f`` is invertible iff ``B`` is.  :class:`GeneralizedCalibration` therefore parametrises ``B``
(:class:`~flowforge.flows.sphere.InvertibleMatrix`, ``log |det B| = sum s``) and reports
``A = V B V^T + 1 1^T / n``.  ``A = a I`` gives ``B = a I_{n-1}``: the calibration transform.

Numerics: log-probabilities through ``log_softmax`` (log-sum-exp), ``q = exp(log q)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.base import Transform
from flowforge.flows.sphere import InvertibleMatrix


def _check_dim(dim: int, name: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ConfigError(f"{name} acts on the probability simplex in R^n and needs an integer n >= 2, got {dim!r}")
    return dim


def helmert_basis(n: int, dtype=torch.float64, device=None) -> Tensor:
    """An orthonormal basis ``V`` (n x (n-1)) of ``{v : sum v = 0}``: column j - 1 is
    ``(1, ..., 1, -j, 0, ..., 0) / sqrt(j (j + 1))`` with j ones (built in ``dtype``, no rounding)."""
    i = torch.arange(n, dtype=dtype, device=device)[:, None]
    j = torch.arange(1, n, dtype=dtype, device=device)[None, :]
    v = torch.where(i < j, torch.ones_like(i * j), torch.where(i == j, -j.expand(n, -1), torch.zeros_like(i * j)))
    return v / torch.sqrt(j * (j + 1))


def _gauged_offset(b: Sequence[float] | Tensor, n: int) -> Tensor:
    """The free part ``b_{1:n-1} - b_n`` of an offset (softmax forgets a common shift), in float64."""
    b = torch.as_tensor(b, dtype=torch.float64)
    if b.shape != (n,) or not torch.isfinite(b).all():
        raise ConfigError(f"the offset b must be {n} finite numbers, got {b.tolist()}")
    return b[:-1] - b[-1]


class _Offset(Transform):
    """The gauged offset ``b = [b_free, 0]`` shared by both calibration transforms."""

    def _init_offset(self, b: Sequence[float] | Tensor | None) -> None:
        self.b_free = nn.Parameter(torch.zeros(self.dim - 1))
        if b is not None:
            self.set_offset(b)

    @torch.no_grad()
    def set_offset(self, b: Sequence[float] | Tensor) -> None:
        """Set ``b`` (any representative: ``b + c 1`` acts the same; stored as ``b_{1:n-1} - b_n``)."""
        self.b_free.copy_(_gauged_offset(b, self.dim).to(self.b_free.dtype))

    @property
    def b(self) -> Tensor:
        return torch.cat([self.b_free, self.b_free.new_zeros(1)])


class Calibration(_Offset):
    """``f(p) = softmax(a log p + b)``: ``a = exp(log_a) > 0``, ``b = [b_free, 0]``."""

    def __init__(self, dim: int, a: float = 1.0, b: Sequence[float] | None = None):
        super().__init__()
        self.dim = _check_dim(dim, "Calibration")
        if not (isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0 and math.isfinite(a)):
            raise ConfigError(
                f"the calibration scale a must be a finite number > 0 (a <= 0 is not invertible), got {a!r}"
            )
        self.log_a = nn.Parameter(torch.tensor(math.log(a)))
        self._init_offset(b)

    @property
    def a(self) -> Tensor:
        return self.log_a.exp()

    def forward(self, p: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_p = torch.log(p)
        log_q = torch.log_softmax(self.log_a.exp() * log_p + self.b, dim=1)
        log_ratio = (self.dim - 1) * self.log_a + log_q.sum(1) - log_p.sum(1)
        return log_q.exp(), log_ratio

    def inverse(self, q: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(q)[0]

    def inverse_and_log_det(self, q: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_q = torch.log(q)
        log_p = torch.log_softmax((log_q - self.b) * torch.exp(-self.log_a), dim=1)
        return log_p.exp(), -((self.dim - 1) * self.log_a + log_q.sum(1) - log_p.sum(1))


class GeneralizedCalibration(_Offset):
    """``f(p) = softmax(A log p + b)`` with ``A = V B V^T + 1 1^T / n`` (only ``B`` matters, see the module
    docstring); ``B`` starts at the identity, or at ``V^T A V`` for a given ``matrix`` A with ``A 1 = lambda 1``."""

    def __init__(self, dim: int, matrix: Tensor | None = None, b: Sequence[float] | None = None):
        super().__init__()
        self.dim = _check_dim(dim, "GeneralizedCalibration")
        self.log_ratio_map = InvertibleMatrix(dim - 1)
        self._init_offset(b)
        if matrix is not None:
            self.set_matrix(matrix)

    @torch.no_grad()
    def set_matrix(self, matrix: Tensor) -> None:
        """Set ``A``; raises :class:`ConfigError` unless ``A 1`` is parallel to ``1`` and ``V^T A V`` is invertible."""
        a = torch.as_tensor(matrix, dtype=torch.float64)
        n = self.dim
        if a.shape != (n, n):
            raise ConfigError(f"the calibration matrix A must have shape ({n}, {n}), got {tuple(a.shape)}")
        v = helmert_basis(n)
        leak = float((v.T @ a @ torch.ones(n, dtype=torch.float64)).norm())
        if leak > 1e-9 * max(1.0, float(a.abs().max())):
            raise ConfigError(
                "the generalised calibration needs the all-ones vector as an eigenvector of A (equal row sums), "
                f"else f is not invertible on the simplex; got ||V^T A 1|| = {leak:.3g}: make every row of A sum to "
                "the same value"
            )
        self.log_ratio_map.set_matrix(v.T @ a @ v)

    @property
    def basis(self) -> Tensor:
        """``V`` in the parameters' dtype (rebuilt on every call: exact in float64)."""
        return helmert_basis(self.dim, self.b_free.dtype, self.b_free.device)

    def matrix(self) -> Tensor:
        """The full ``A = V B V^T + 1 1^T / n`` (one representative; ``A + 1 w^T`` acts the same)."""
        v = self.basis
        return v @ self.log_ratio_map.matrix() @ v.T + torch.full_like(v @ v.T, 1.0 / self.dim)

    def forward(self, p: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_p, v = torch.log(p), self.basis
        s = self.log_ratio_map.apply(log_p @ v)  # B V^T log p
        log_q = torch.log_softmax(s @ v.T + self.b, dim=1)
        log_ratio = self.log_ratio_map.log_abs_det() + log_q.sum(1) - log_p.sum(1)
        return log_q.exp(), log_ratio

    def inverse(self, q: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(q)[0]

    def inverse_and_log_det(self, q: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_q, v = torch.log(q), self.basis
        s = self.log_ratio_map.solve((log_q - self.b) @ v)
        log_p = torch.log_softmax(s @ v.T, dim=1)
        return log_p.exp(), -(self.log_ratio_map.log_abs_det() + log_q.sum(1) - log_p.sum(1))
