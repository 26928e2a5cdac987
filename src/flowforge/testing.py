"""Reference computations used by the test-suite (and available to users who write their own).

Everything here is brute force on purpose: slow, simple, and exact up to floating point.
"""

from __future__ import annotations

import torch
from torch import Tensor


def jacobian_matrix(fn, x: Tensor, copies: bool = True) -> Tensor:
    """Per-sample full Jacobian ``d fn(x)_i / d x_j`` of a batched map, shape ``(B, D_out, D_in)``.

    With ``copies`` (the default), each sample is repeated ``D`` times and the copies go through ``fn`` as one
    batch; one backward pass with the identity as the cotangents (copy ``i`` gets ``e_i``) leaves row ``i`` of
    the Jacobian in copy ``i``'s gradient.  Without, or for a map whose output size differs from its input's,
    each sample goes through ``fn`` alone (a batch of one) followed by ``D_out`` backward passes: slower for most
    maps, faster for one whose cost grows with the batch times the dimension (a continuous flow with the exact
    divergence).

    Either way ``fn`` must treat the examples of a batch independently (initialise data-dependent layers such
    as ActNorm first); every copy then runs what a batch of one would, adaptive solvers included (identical
    copies take identical steps and iterations).
    """
    out = []
    for xi in x:
        jac = _jacobian_of_copies(fn, xi) if copies else None
        out.append(_jacobian_one_by_one(fn, xi) if jac is None else jac)
    return torch.stack(out)


def _jacobian_of_copies(fn, xi: Tensor) -> Tensor | None:
    """The Jacobian of ``fn`` at the sample ``xi`` from ``D`` copies in one batch, or None for a non-square map."""
    n = xi.numel()
    with torch.enable_grad():
        batch = xi.detach().unsqueeze(0).repeat(n, *([1] * xi.dim())).requires_grad_(True)
        y = fn(batch).reshape(n, -1)
        if y.shape[1] != n:
            return None
        (grad,) = torch.autograd.grad(y, batch, torch.eye(n, dtype=y.dtype, device=y.device))
    return grad.reshape(n, n)


def _jacobian_one_by_one(fn, xi: Tensor) -> Tensor:
    """The Jacobian of ``fn`` at the sample ``xi`` as a batch of one, one backward pass per output."""
    return torch.autograd.functional.jacobian(lambda v: fn(v.reshape(1, *xi.shape)).reshape(-1), xi.reshape(-1))


def mean_over_copies(fn, x: Tensor, copies: int) -> Tensor:
    """``fn`` on ``copies`` copies of the batch ``x`` stacked into one batch, averaged over the copies: one draw of
    a randomised per-example estimator that gets its own probes per copy but makes its per-call random choices (the
    roulette's series length, a host draw) once, so that the calls, not the copies, are independent draws."""
    out = fn(x.repeat(copies, *([1] * (x.dim() - 1))))
    return out.reshape(copies, *x.shape[:1], *out.shape[1:]).mean(0)


def batch_jacobian_logdet(transform, x: Tensor, copies: bool = True) -> Tensor:
    """Brute-force ``log |det df/dx|`` per sample of a transform returning ``(z, log_det)``
    (``copies``: see :func:`jacobian_matrix`)."""
    return torch.linalg.slogdet(jacobian_matrix(lambda v: transform(v)[0], x, copies))[1]


def exact_lipschitz_linear(weight: Tensor) -> float:
    """Largest singular value of a weight matrix (float64); a ``(out, in, 1, 1)`` kernel is read as ``(out, in)``."""
    w = weight.detach().to(torch.float64)
    return float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2))


def conv_operator_matrix(weight: Tensor, input_size, stride: int = 1, padding=None) -> Tensor:
    """The convolution ``x -> conv2d(x, weight)`` (no bias, zero padding) on ``(in, H, W)`` inputs as a dense
    float64 matrix of shape ``(out * H' * W', in * H * W)``, built by convolving every basis image."""
    w = weight.detach().to(torch.float64)
    c_in, k = w.shape[1], w.shape[-1]
    padding = k // 2 if padding is None else padding
    h, wd = input_size
    n = c_in * h * wd
    basis = torch.eye(n, dtype=torch.float64, device=w.device).reshape(n, c_in, h, wd)
    columns = torch.nn.functional.conv2d(basis, w, None, stride, padding)
    return columns.reshape(n, -1).t()


def exact_lipschitz_conv(weight: Tensor, input_size, padding=None, stride: int = 1) -> float:
    """Largest singular value of the unrolled convolution operator (see :func:`conv_operator_matrix`)."""
    return float(torch.linalg.matrix_norm(conv_operator_matrix(weight, input_size, stride, padding), ord=2))


def exact_lipschitz(layer) -> float:
    """Exact 2 -> 2 norm of a normalised layer's current operator ``A(W_hat)``: the weight matrix for linear and
    1x1 layers, the unrolled convolution at the layer's ``input_size`` for larger kernels."""
    with torch.no_grad():
        w = layer.normalized_weight()
    if w.dim() == 4 and w.shape[-1] > 1:
        return exact_lipschitz_conv(w, layer.input_size, layer.padding, layer.stride)
    return exact_lipschitz_linear(w)


# ----------------------------------------------------------------------------- manifold volume ratios
def sphere_tangent_basis(x: Tensor) -> Tensor:
    """An orthonormal basis ``E_x`` (d x (d-1)) of the tangent space ``x^perp`` of the unit sphere at ``x``
    (a single point): the last d-1 columns of a complete QR factorisation of ``x``."""
    q, _ = torch.linalg.qr(x.reshape(-1, 1), mode="complete")
    return q[:, 1:]


def simplex_tangent_basis(n: int, dtype=torch.float64, device=None) -> Tensor:
    """An orthonormal basis (n x (n-1)) of the simplex's tangent space ``{v : sum v = 0}``."""
    ones = torch.ones(n, 1, dtype=dtype, device=device)
    q, _ = torch.linalg.qr(ones, mode="complete")
    return q[:, 1:]


def _map_output(fn):
    def out(v: Tensor) -> Tensor:
        y = fn(v)
        return y[0] if isinstance(y, tuple) else y

    return out


def sphere_volume_ratio(f, x: Tensor, method: str = "gram") -> Tensor:
    """Brute-force differential volume ratio ``dvol(f(x)) / dvol(x)`` of a map of the unit sphere, per sample.

    ``J`` is the ambient autograd Jacobian of ``f`` (a batched map, or a transform returning ``(z, log_det)``)
    at each ``x``; ``method="gram"`` gives ``sqrt(det((J E_x)^T (J E_x)))`` (the product of the singular values
    of ``J E_x``) and ``method="sandwich"``
    ``|det(E_{f(x)}^T J E_x)|`` (equal when ``f`` maps the sphere into itself).
    """
    fn = _map_output(f)
    jac = jacobian_matrix(fn, x)
    z = fn(x)
    out = []
    for j, xi, zi in zip(jac, x, z):
        je = j @ sphere_tangent_basis(xi)
        if method == "gram":  # sqrt(det(G)) as the product of singular values (no squared condition number)
            out.append(torch.linalg.svdvals(je).prod())
        elif method == "sandwich":
            out.append(torch.linalg.det(sphere_tangent_basis(zi).T @ je).abs())
        else:
            raise ValueError(f"method must be 'gram' or 'sandwich', got {method!r}")
    return torch.stack(out)


def simplex_volume_ratio(f, p: Tensor, method: str = "gram") -> Tensor:
    """Brute-force differential volume ratio of a map of the probability simplex, per sample: as
    :func:`sphere_volume_ratio` with the constant tangent space ``{v : sum v = 0}`` on both sides."""
    fn = _map_output(f)
    jac = jacobian_matrix(fn, p)
    e = simplex_tangent_basis(p.shape[1], p.dtype, p.device)
    out = []
    for j in jac:
        je = j @ e
        if method == "gram":  # sqrt(det(G)) as the product of singular values (no squared condition number)
            out.append(torch.linalg.svdvals(je).prod())
        elif method == "sandwich":
            out.append(torch.linalg.det(e.T @ je).abs())
        else:
            raise ValueError(f"method must be 'gram' or 'sandwich', got {method!r}")
    return torch.stack(out)
