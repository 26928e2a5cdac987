"""Simple spherical flows: an invertible affine map of R^d followed by radial projection onto S^{d-1}.

Points are unit vectors ``x`` in R^d; ``log_det`` is the log of the *differential volume ratio*

    R(x) = dvol(f(x)) / dvol(x) = sqrt(det((J E_x)^T (J E_x))) = |det(E_{f(x)}^T J E_x)|,

with ``J`` the ambient Jacobian of ``f`` and ``E_x`` an orthonormal basis of the tangent space
``x^perp`` (surface measure of the sphere on both sides).  Closed forms (derivation below):

* normalised translation ``f(x) = (x + k) / ||x + k||``, ``||k|| < 1``::

      R(x) = (1 + k^T x) / ||x + k||^d
      f^{-1}(z) = t z - k,  t = z^T k + sqrt((z^T k)^2 + 1 - ||k||^2)
      R(f^{-1}(z)) = sqrt((z^T k)^2 + 1 - ||k||^2) / t^(d-1)

* normalised linear ``f(x) = M x / ||M x||``, ``M`` invertible::

      R(x) = |det M| / ||M x||^d,      f^{-1}(z) = M^{-1} z / ||M^{-1} z||

* normalised affine ``f(x) = (M x + k) / ||M x + k||``::

      R(x) = |det M| (1 + x^T M^{-1} k) / ||M x + k||^d = |det(M + k x^T)| / ||M x + k||^d

  invertible iff ``||M^{-1} k|| < 1``; with ``u = M^{-1} k`` it is the normalised linear map ``M``
  after the normalised translation ``u`` (radial projection commutes with scaling), which gives the
  inverse ``f^{-1}(z) = t w - u`` with ``w = M^{-1} z / ||M^{-1} z||`` and ``t`` as above (``k -> u``).

Derivation.  Let ``y = M x + k``, ``r = ||y||``, ``z = y / r``.  A tangent vector ``v`` at ``x`` maps
to ``(I - z z^T) M v / r``.  Complete ``E_x`` by the normal ``x``: ``|det [M E_x, y]| =
|det M| |det [E_x, x + M^{-1} k]| = |det M| |1 + x^T M^{-1} k|``; removing the ``z``-components of
the first d-1 columns (column operations against ``y = r z``) leaves ``r vol((I - z z^T) M E_x)``.
Dividing by ``r^(d-1)`` for the ``1/r`` factor of each tangent column gives ``R``.  For the inverse of
the translation, ``x = t z - k`` with ``||x|| = 1`` is the quadratic ``t^2 - 2 t z^T k + ||k||^2 - 1 = 0``
whose roots have product ``||k||^2 - 1 < 0``: exactly one is positive.  Substituting it,
``1 + k^T x = t (t - z^T k)`` and ``||x + k|| = t``, which gives ``R(f^{-1}(z))``.

Parametrisations.  ``k = v / sqrt(1 + ||v||^2)`` for a free ``v`` in R^d keeps ``||k|| < 1``
(smooth, ``k ~ v`` near 0, and ``1 - ||k||^2 = 1 / (1 + ||v||^2)`` is computed without cancellation).
``M = P L (U + diag(sign * exp(s)))`` (:class:`InvertibleMatrix`, identity at init) with ``log |det M| =
sum s``; the normalised affine layer stores ``u = M^{-1} k`` (parametrised like ``k``) so it is
invertible for every parameter value.  All inverses are closed form and differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.base import Transform


def _check_dim(dim: int, name: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ConfigError(f"{name} acts on the unit sphere in R^dim and needs an integer dim >= 2, got {dim!r}")
    return dim


def _ball_parameter(k: Tensor) -> Tensor:
    """The free vector ``v`` with ``k = v / sqrt(1 + ||v||^2)`` (inverse of :func:`_ball_point`)."""
    return k / torch.sqrt(1 - k.pow(2).sum())


def _ball_point(v: Tensor) -> tuple[Tensor, Tensor]:
    """``(k, 1 - ||k||^2)`` for ``k = v / sqrt(1 + ||v||^2)``."""
    s = 1 + v.pow(2).sum()
    return v / torch.sqrt(s), 1 / s


def _translation_inverse(z: Tensor, k: Tensor, one_minus_k2: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, log R(x))`` of the normalised translation for ``x = f^{-1}(z)``.

    The positive root ``t`` is taken in the form without cancellation: ``c + sqrt(disc)`` for
    ``c = z^T k >= 0``, else ``(1 - ||k||^2) / (sqrt(disc) - c)`` (the same number)."""
    d = z.shape[-1]
    c = z @ k
    disc = c * c + one_minus_k2
    root = torch.sqrt(disc)
    t = torch.where(c >= 0, c + root, one_minus_k2 / (root - c))
    x = t[:, None] * z - k
    return x, 0.5 * torch.log(disc) - (d - 1) * torch.log(t)


class InvertibleMatrix(nn.Module):
    """``M = P L (U + diag(sign * exp(s)))``: P a fixed permutation, L unit lower-triangular, U strictly
    upper-triangular, ``sign`` a fixed +-1 vector; ``log |det M| = sum s``.  Starts at the identity
    (or at ``matrix`` when given, through its pivoted LU factorisation)."""

    def __init__(self, dim: int, matrix: Tensor | None = None):
        super().__init__()
        self.dim = dim
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.register_buffer("perm", torch.eye(dim))
        self.register_buffer("sign", torch.ones(dim))
        if matrix is not None:
            self.set_matrix(matrix)

    @torch.no_grad()
    def set_matrix(self, matrix: Tensor) -> None:
        m = torch.as_tensor(matrix, dtype=torch.float64)
        if m.shape != (self.dim, self.dim):
            raise ConfigError(f"the matrix must have shape ({self.dim}, {self.dim}), got {tuple(m.shape)}")
        p, lower, upper = torch.linalg.lu(m)
        diag = torch.diagonal(upper)
        if not torch.isfinite(m).all() or bool((diag.abs() < 1e-12 * m.abs().max().clamp_min(1e-300)).any()):
            raise ConfigError("the matrix must be invertible (finite, non-zero determinant); got a singular one")
        dtype = self.log_diag.dtype
        self.perm.copy_(p.to(dtype))
        self.sign.copy_(torch.sign(diag).to(dtype))
        self.lower.copy_(torch.tril(lower, -1).to(dtype))
        self.upper.copy_(torch.triu(upper, 1).to(dtype))
        self.log_diag.copy_(torch.log(diag.abs()).to(dtype))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_diag))
        return lower, upper

    def matrix(self) -> Tensor:
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def log_abs_det(self) -> Tensor:
        return self.log_diag.sum()

    def apply(self, x: Tensor) -> Tensor:
        """``M x`` for each row ``x`` of a batch ``(B, d)``."""
        return x @ self.matrix().T

    def solve(self, y: Tensor) -> Tensor:
        """``M^{-1} y`` for each row of a batch ``(B, d)`` by two triangular solves."""
        lower, upper = self._factors()
        rhs = (y @ self.perm).T  # P^T y, as columns
        w = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, w, upper=True).T


class NormalizedTranslation(Transform):
    """``f(x) = (x + k) / ||x + k||`` on S^{d-1}, ``k = v / sqrt(1 + ||v||^2)`` (so ``||k|| < 1``)."""

    def __init__(self, dim: int, k: Tensor | None = None):
        super().__init__()
        self.dim = _check_dim(dim, "NormalizedTranslation")
        self.v = nn.Parameter(torch.zeros(dim))
        if k is not None:
            self.set_k(k)

    @torch.no_grad()
    def set_k(self, k: Tensor) -> None:
        """Set the translation; raises :class:`ConfigError` unless ``||k|| < 1`` (else not invertible)."""
        k = torch.as_tensor(k, dtype=torch.float64)
        if k.shape != (self.dim,):
            raise ConfigError(f"the translation k must have shape ({self.dim},), got {tuple(k.shape)}")
        norm = float(k.norm())
        if not norm < 1:
            raise ConfigError(
                f"the normalised translation needs ||k|| < 1 to be invertible on the sphere, got ||k|| = {norm:.6g}; "
                f"scale k into the open unit ball"
            )
        self.v.copy_(_ball_parameter(k).to(self.v.dtype))

    @property
    def k(self) -> Tensor:
        return _ball_point(self.v)[0]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k, _ = _ball_point(self.v)
        y = x + k
        r = y.norm(dim=1)
        return y / r[:, None], torch.log1p(x @ k) - self.dim * torch.log(r)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(z)[0]

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k, one_minus_k2 = _ball_point(self.v)
        x, log_ratio = _translation_inverse(z, k, one_minus_k2)
        return x, -log_ratio


class NormalizedLinear(Transform):
    """``f(x) = M x / ||M x||`` on S^{d-1}, ``M`` an :class:`InvertibleMatrix` (identity at init)."""

    def __init__(self, dim: int, matrix: Tensor | None = None):
        super().__init__()
        self.dim = _check_dim(dim, "NormalizedLinear")
        self.linear = InvertibleMatrix(dim, matrix)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self.linear.apply(x)
        r = y.norm(dim=1)
        return y / r[:, None], self.linear.log_abs_det() - self.dim * torch.log(r)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(z)[0]

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w = self.linear.solve(z)
        r = w.norm(dim=1)
        # f^{-1} is the normalised linear map of M^{-1}: its ratio is |det M|^{-1} / ||M^{-1} z||^d
        return w / r[:, None], -self.linear.log_abs_det() - self.dim * torch.log(r)


class NormalizedAffine(Transform):
    """``f(x) = (M x + k) / ||M x + k||`` on S^{d-1} with ``k = M u``, ``u = v / sqrt(1 + ||v||^2)``, so the
    invertibility condition ``||M^{-1} k|| < 1`` holds for every parameter value."""

    def __init__(self, dim: int, matrix: Tensor | None = None, k: Tensor | None = None):
        super().__init__()
        self.dim = _check_dim(dim, "NormalizedAffine")
        self.linear = InvertibleMatrix(dim, matrix)
        self.v = nn.Parameter(torch.zeros(dim))
        if k is not None:
            self.set_k(k)

    @torch.no_grad()
    def set_k(self, k: Tensor) -> None:
        """Set the translation ``k`` (for the current ``M``); needs ``||M^{-1} k|| < 1``."""
        k = torch.as_tensor(k, dtype=self.v.dtype)
        if k.shape != (self.dim,):
            raise ConfigError(f"the translation k must have shape ({self.dim},), got {tuple(k.shape)}")
        u = self.linear.solve(k[None])[0].double()
        norm = float(u.norm())
        if not norm < 1:
            raise ConfigError(
                f"the normalised affine flow needs ||M^-1 k|| < 1 to be invertible on the sphere, got {norm:.6g}; "
                f"shrink k (or set M first)"
            )
        self.v.copy_(_ball_parameter(u).to(self.v.dtype))

    @property
    def u(self) -> Tensor:
        return _ball_point(self.v)[0]

    @property
    def k(self) -> Tensor:
        return self.linear.apply(self.u[None])[0]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, _ = _ball_point(self.v)
        y = self.linear.apply(x + u)  # M x + k
        r = y.norm(dim=1)
        log_ratio = self.linear.log_abs_det() + torch.log1p(x @ u) - self.dim * torch.log(r)
        return y / r[:, None], log_ratio

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(z)[0]

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, one_minus_u2 = _ball_point(self.v)
        w = self.linear.solve(z)
        r = w.norm(dim=1)
        x, log_ratio_translation = _translation_inverse(w / r[:, None], u, one_minus_u2)
        return x, -self.linear.log_abs_det() - self.dim * torch.log(r) - log_ratio_translation
