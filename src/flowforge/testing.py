"""Reference computations used by the test-suite (and available to users who write their own).

Everything here is brute force on purpose: slow, simple, and exact up to floating point.
"""

from __future__ import annotations

import torch
from torch import Tensor


def jacobian_matrix(fn, x: Tensor) -> Tensor:
    """Per-sample full Jacobian ``d fn(x)_i / d x_j`` of a batched map, shape ``(B, D_out, D_in)``.

    Each sample is pushed through ``fn`` alone (batch of one), so ``fn`` must not depend on the
    batch (initialise data-dependent layers such as ActNorm first).
    """
    out = []
    for xi in x:
        def f(v: Tensor, shape=xi.shape) -> Tensor:
            return fn(v.reshape(1, *shape)).reshape(-1)

        out.append(torch.autograd.functional.jacobian(f, xi.reshape(-1)))
    return torch.stack(out)


def batch_jacobian_logdet(transform, x: Tensor) -> Tensor:
    """Brute-force ``log |det df/dx|`` per sample of a transform returning ``(z, log_det)``."""
    return torch.linalg.slogdet(jacobian_matrix(lambda v: transform(v)[0], x))[1]


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
