"""Pila and CPila activations: smoothness at 0, closed-form derivatives against autograd, second
derivatives through ``value_and_derivative``, the shape of Pila, and the Lipschitz constant of CPila."""

import math

import numpy as np
import pytest
import torch

from flowforge.errors import ConfigError
from flowforge.nn.activations import (
    LIPSCHITZ_ACTIVATIONS,
    CPila,
    Pila,
    channel_multiplier,
    lipschitz_activation,
)

F64 = torch.float64


def pila_reference(z, k):
    """The defining formula, written independently of the module's factorised evaluation."""
    neg = (k**2 / 2 * z**3 - k * z**2 + z) * torch.exp(k * z.clamp_max(0))
    return torch.where(z > 0, z, neg)


def derivatives(f, x):
    """(f(x), f'(x), f''(x)) elementwise by autograd (double backward)."""
    x = x.clone().requires_grad_(True)
    y = f(x)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    return y.detach(), d1.detach(), d2


@pytest.mark.parametrize("k", [5.0, 2.0, 11.0])
def test_pila_is_c2_at_zero(k):
    pila = Pila(k)
    eps = 1e-10
    left = derivatives(pila, torch.tensor([-eps], dtype=F64))
    right = derivatives(pila, torch.tensor([eps], dtype=F64))
    at0 = derivatives(pila, torch.tensor([0.0], dtype=F64))
    for side in (left, right, at0):
        value, slope, curv = (float(t) for t in side)
        assert abs(value) < 1e-8 and abs(slope - 1) < 1e-8 and abs(curv) < 1e-8, side
    for a, b in zip(left, right):
        assert abs(float(a) - float(b)) < 1e-8


def test_pila_matches_formula_and_closed_form_derivatives():
    for k in (5.0, 1.5):
        pila = Pila(k).double()
        x = torch.linspace(-8, 4, 4001, dtype=F64)
        x = x[x != 0]
        y, d, d2 = derivatives(pila, x)
        assert torch.allclose(y, pila_reference(x, k), atol=1e-14, rtol=1e-12)
        val, slope = pila.value_and_derivative(x)
        assert torch.allclose(val, y, atol=1e-15)
        assert torch.allclose(slope, d, atol=1e-13)  # closed form == autograd of the value
        # closed-form second derivative k (t^3/2 + 2 t^2) e^t on z < 0, 0 on z > 0
        t = k * x
        ref2 = torch.where(x > 0, torch.zeros_like(x), k * (t**3 / 2 + 2 * t**2) * torch.exp(t.clamp_max(0)))
        assert torch.allclose(d2, ref2, atol=1e-12)


def test_second_derivative_through_value_and_derivative():
    """Autograd through the closed-form derivative must give the true second derivative (it is what the
    Neumann log-det surrogate differentiates)."""
    pila = Pila().double()
    x = torch.linspace(-3, 2, 1001, dtype=F64)
    x = x[x != 0].requires_grad_(True)
    _, slope = pila.value_and_derivative(x)
    (via_slope,) = torch.autograd.grad(slope.sum(), x)
    _, _, via_value = derivatives(pila, x.detach())
    assert torch.allclose(via_slope, via_value, atol=1e-12)
    assert via_slope.abs().max() > 1.0  # the curvature is far from zero on z < 0


def test_pila_minimum_and_slope_range():
    k = 5.0
    pila = Pila(k).double()
    z = torch.linspace(-4, 1, 5_000_001, dtype=F64)
    y, d = pila.value_and_derivative(z)
    i = int(y.argmin())
    zmin, ymin = float(z[i]), float(y[i])
    # independent check: Pila' = 0 where t^3 + t^2 - 2t + 2 = 0 (t = k z)
    roots = np.roots([1.0, 1.0, -2.0, 2.0])
    t_star = float(roots[np.abs(roots.imag) < 1e-12].real[0])
    assert abs(zmin - t_star / k) < 1e-5
    assert abs(ymin - float(pila_reference(torch.tensor(t_star / k, dtype=F64), k))) < 1e-10
    assert abs(ymin - (-0.274220)) < 1e-6 and abs(zmin - (-0.453905)) < 1e-5
    # slope range: min -19 e^{-4} at t = -4 (z = -0.8), max 1 on z >= 0; so Lip(Pila) = 1
    assert abs(float(d.min()) + 19 * math.exp(-4)) < 1e-12 and abs(float(z[d.argmin()]) + 0.8) < 1e-5
    assert float(d.max()) == 1.0 and float(d[z < 0].max()) <= 1.0
    assert bool((y[z < 0] < 0).all())  # negative (and non-monotone) on z < 0


@pytest.mark.parametrize("k", [5.0, 0.7])
def test_pila_gradcheck_and_gradgradcheck(k):
    pila = Pila(k)
    x = torch.tensor([-6.0, -2.0, -0.8, -0.45, -0.1, -1e-3, 1e-3, 0.3, 2.5], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(pila, (x,))
    assert torch.autograd.gradgradcheck(pila, (x,))
    slope = lambda v: pila.value_and_derivative(v)[1]  # noqa: E731
    assert torch.autograd.gradcheck(slope, (x,))
    assert torch.autograd.gradgradcheck(slope, (x,))


def test_pila_extreme_inputs_are_finite():
    pila = Pila()
    for dtype in (torch.float32, F64, torch.float16, torch.bfloat16):
        x = torch.tensor([-float("inf"), -1e4, -60.0, -1.0, 1.0, 1e4], dtype=dtype, requires_grad=True)
        y, d = pila.value_and_derivative(x)
        assert torch.isfinite(y).all() and torch.isfinite(d).all(), dtype
        (g,) = torch.autograd.grad(y.sum() + d.sum(), x)  # first and second derivatives
        assert torch.isfinite(g).all(), dtype
        y, d = y.detach().double(), d.detach().double()
        assert y[:3].abs().max() < 1e-30 and d[:3].abs().max() < 1e-30, dtype  # e^t has underflowed
        assert float(y[-2]) == 1.0 and float(d[-1]) == 1.0, dtype


def test_pila_linearize_matches_func_jvp():
    pila = Pila().double()
    x = torch.randn(6, 5, dtype=F64) * 2
    v = torch.randn_like(x)
    y, jvp = pila.linearize(x)
    ref_y, ref = torch.func.jvp(pila, (x,), (v,))
    assert torch.allclose(y, ref_y, atol=1e-15) and torch.allclose(jvp(v), ref, atol=1e-13)


def test_pila_bad_k():
    for bad in (0.0, -1.0, float("nan"), float("inf"), "5", True):
        with pytest.raises(ConfigError, match="k must be"):
            Pila(bad)


def test_cpila_lipschitz_constant_on_dense_grid():
    """CPila's Jacobian stacks two diagonals, so Lip = max_x ||(dy1/dx, dy2/dx)||_2; measured by autograd
    (independent of the closed form) on 200k points of [-10, 10]."""
    act = CPila().double()
    x = torch.linspace(-10, 10, 200_001, dtype=F64).reshape(-1, 1).requires_grad_(True)
    y = act(x)
    (s1,) = torch.autograd.grad(y[:, 0].sum(), x, retain_graph=True)
    (s2,) = torch.autograd.grad(y[:, 1].sum(), x)
    norm = torch.sqrt(s1**2 + s2**2).reshape(-1)
    lip = float(norm.max())
    assert lip <= 1.0 and lip > 0.99, lip
    assert abs(lip - math.sqrt(1 + 361 * math.exp(-8)) / 1.06) < 1e-8  # maximum at x = +-0.6
    assert abs(abs(float(x.detach().reshape(-1)[norm.argmax()])) - 0.6) < 1e-3
    # without the 1/1.06 the activation would not be 1-Lipschitz
    assert lip * CPila.scale > 1.05


def test_cpila_doubles_channels_and_matches_formula():
    act = lipschitz_activation("cpila").double()
    assert isinstance(act, CPila) and "cpila" in LIPSCHITZ_ACTIVATIONS and "pila" in LIPSCHITZ_ACTIVATIONS
    assert channel_multiplier("cpila") == 2 and channel_multiplier("clipswish") == 2
    assert channel_multiplier("pila") == 1 and channel_multiplier("lipswish") == 1
    x = torch.randn(3, 5, 4, 4, dtype=F64)
    y = act(x)
    assert y.shape == (3, 10, 4, 4)
    ref = torch.cat([pila_reference(x - 0.2, 5.0), pila_reference(-x - 0.2, 5.0)], dim=1) / 1.06
    assert torch.allclose(y, ref, atol=1e-14)


def test_cpila_linearize_matches_func_jvp_and_is_differentiable():
    act = CPila().double()
    x = (torch.randn(4, 3, 5, 5, dtype=F64) * 1.5).requires_grad_(True)
    v = torch.randn(4, 3, 5, 5, dtype=F64)
    y, jvp = act.linearize(x)
    ref_y, ref = torch.func.jvp(act, (x.detach(),), (v,))
    out = jvp(v)
    assert torch.allclose(y, ref_y, atol=1e-15) and torch.allclose(out, ref, atol=1e-13)
    # d/dx <u, J(x) v> through the frozen derivative equals double-backward autograd
    u = torch.randn_like(out)
    (g_lin,) = torch.autograd.grad((u * out).sum(), x)
    _, ref_diff = torch.autograd.functional.jvp(act, x, v, create_graph=True)
    (g_ref,) = torch.autograd.grad((u * ref_diff).sum(), x)
    assert torch.allclose(g_lin, g_ref, atol=1e-12)
