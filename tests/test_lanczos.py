"""Golub-Kahan-Lanczos (flowforge.nn.lanczos): the step count and cost of power iteration, an estimate never below
power iteration's from the same start, the exact singular-pair identities, restarts, invariant Krylov spaces,
zero and non-finite operators, and the spectral-norm layers' first estimate."""

import pytest
import torch
from test_lipschitz import _clustered_matrix  # (top singular values 1.0 and 0.999)

from flowforge.nn.lanczos import top_singular_triplet
from flowforge.nn.lipschitz import SpectralNormConv2d, SpectralNormLinear, update_lipschitz

F64 = torch.float64


def _plain_power_sigma(w: torch.Tensor, v: torch.Tensor, steps: int) -> float:
    """Plain power iteration from ``v`` for ``steps`` steps: its estimate ``||A^T u||``."""
    v = v / v.norm()
    for _ in range(steps):
        u = w @ v
        u = u / u.norm()
        v = w.T @ u
        sigma = float(v.norm())
        v = v / v.norm()
    return sigma


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_step_count_is_power_iterations_cost_and_the_estimate_never_below_it(steps):
    """One step is exactly a power-iteration step; k steps (k products with A and k with A^T) give an estimate at
    least power iteration's after k steps from the same start, with u^T A v = sigma and A^T u = sigma v."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 30, generator=g, dtype=F64)
    v0 = torch.randn(30, generator=g, dtype=F64)
    calls = {"op": 0, "adj": 0}

    def op(x):
        calls["op"] += 1
        return w @ x

    def adj(y):
        calls["adj"] += 1
        return w.T @ y

    t = top_singular_triplet(op, adj, v0, max_iters=steps, rtol=0.0)
    assert t.iters == steps and calls == {"op": steps, "adj": steps} and not t.converged
    power = _plain_power_sigma(w, v0, steps)
    if steps == 1:
        assert float(t.sigma) == pytest.approx(power, rel=1e-12)
    else:
        assert float(t.sigma) > power * (1 + 1e-6)
    assert float(t.sigma) <= float(torch.linalg.svdvals(w)[0]) * (1 + 1e-12)
    assert float(t.u @ w @ t.v) == pytest.approx(float(t.sigma), rel=1e-10)
    assert float((w.T @ t.u - t.sigma * t.v).norm()) < 1e-10
    assert float(t.u.norm()) == pytest.approx(1.0) and float(t.v.norm()) == pytest.approx(1.0)


def test_clustered_top_values_resolved_where_power_iteration_stalls():
    w = _clustered_matrix()
    v0 = torch.randn(64, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = top_singular_triplet(lambda x: w @ x, lambda y: w.T @ y, v0, max_iters=100, rtol=1e-9)
    assert t.converged and abs(float(t.sigma) - 1.0) < 1e-9 and t.iters < 100, t
    assert 1.0 - _plain_power_sigma(w, v0, t.iters) > 1e-6, "plain power iteration should stall here"


def test_restarts_invariant_spaces_zero_and_non_finite_operators():
    """Restarting every 4 steps still converges; a rank-3 operator ends exactly within 4 steps (invariant Krylov
    space); a zero operator gives sigma 0; a non-finite product raises."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(50, 40, generator=g, dtype=F64)
    exact = float(torch.linalg.svdvals(w)[0])
    v0 = torch.randn(40, dtype=F64, generator=g)
    t = top_singular_triplet(lambda x: w @ x, lambda y: w.T @ y, v0, 400, 1e-10, max_basis=4)
    assert t.converged and abs(float(t.sigma) - exact) < 1e-9 * exact
    low = torch.randn(50, 3, generator=g, dtype=F64) @ torch.randn(3, 40, generator=g, dtype=F64)
    t = top_singular_triplet(lambda x: low @ x, lambda y: low.T @ y, v0, 50, 0.0)
    assert t.converged and t.iters <= 4
    assert float(t.sigma) == pytest.approx(float(torch.linalg.svdvals(low)[0]), rel=1e-12)
    zero = torch.zeros(5, 4, dtype=F64)
    t = top_singular_triplet(lambda x: zero @ x, lambda y: zero.T @ y, torch.ones(4, dtype=F64), 5, 1e-6)
    assert float(t.sigma) == 0.0 and t.converged
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        top_singular_triplet(lambda x: bad @ x, lambda y: bad.T @ y, torch.ones(40, dtype=F64), 5, 1e-6)
    with pytest.raises(ValueError, match="max_iters"):
        top_singular_triplet(lambda x: w @ x, lambda y: w.T @ y, v0, 0, 1e-6)


def test_spectral_norm_layers_start_from_a_lanczos_estimate():
    """A fresh layer's first update is Lanczos to tolerance: the exact norm (SVD of the matrix, of the unrolled
    convolution) to 1e-6, in fewer steps than the 200-step cap, and the next warm-started update is short."""
    torch.manual_seed(0)
    lin = SpectralNormLinear(64, 64, coeff=0.9, rtol=1e-9).double()
    with torch.no_grad():
        lin.weight.copy_(_clustered_matrix())
    conv = SpectralNormConv2d(3, 8, 3, input_size=(8, 8), coeff=0.9, rtol=1e-8).double()
    eye = torch.eye(3 * 64, dtype=F64).reshape(-1, 3, 8, 8)
    unrolled = torch.nn.functional.conv2d(eye, conv.weight.detach(), padding=1).reshape(3 * 64, -1)
    for layer, exact in ((lin, 1.0), (conv, float(torch.linalg.svdvals(unrolled)[0]))):
        info = update_lipschitz(layer)
        assert info["power_iterations"] < 200 and not info["unconverged"], info
        assert abs(float(layer.sigma) - exact) < 1e-6 * exact
        assert float(layer.initialized) == 1.0
        assert update_lipschitz(layer)["power_iterations"] <= 3


def test_krylov_update_is_one_plain_power_step_per_step_and_refines_with_more():
    """update_lipschitz(method="krylov", max_iters=1) on an initialised layer is exactly one power-iteration step
    from its v (the official code's per-step update); more steps never give a lower estimate; bad names raise."""
    from flowforge.errors import ConfigError
    from flowforge.training.lipschitz_maintenance import LipschitzMaintenance

    torch.manual_seed(1)
    layer = SpectralNormConv2d(3, 6, 3, input_size=(6, 6), coeff=0.9).double()
    update_lipschitz(layer)
    with torch.no_grad():  # a training step's change
        layer.weight.add_(0.2 * torch.randn(layer.weight.shape, dtype=F64))
    w = layer.weight.detach()
    v = layer.v / layer.v.norm()
    u = layer._op(v, w)
    u = u / u.norm()
    expected_v = layer._adj(u, w)
    expected_sigma = float(expected_v.norm())
    state = {k: b.clone() for k, b in layer.state_dict().items()}
    info = update_lipschitz(layer, max_iters=1, method="krylov")
    assert info["power_iterations"] == 1
    assert float(layer.sigma) == pytest.approx(expected_sigma, rel=1e-12)
    torch.testing.assert_close(layer.v, expected_v / expected_sigma, atol=1e-12, rtol=0)
    layer.load_state_dict(state)
    update_lipschitz(layer, max_iters=4, method="krylov")
    assert float(layer.sigma) > expected_sigma
    with pytest.raises(ConfigError, match="method must be one of subspace, krylov"):
        update_lipschitz(layer, method="lanczos")
    with pytest.raises(ConfigError, match="lipschitz_step_method must be one of subspace, krylov"):
        LipschitzMaintenance(step_method="block")


def test_first_estimate_capped_by_init_iters_is_that_many_lanczos_steps():
    """set_init_iters(n): a fresh layer's first estimate is n Lanczos steps (not converged on a clustered
    spectrum), a lower bound of the norm no lower than n power-iteration steps from the same v, and the next
    to-tolerance update reaches the exact norm; LipschitzMaintenance sets it when fitting starts; bad values
    raise."""
    from types import SimpleNamespace

    from flowforge.errors import ConfigError
    from flowforge.nn.lipschitz import set_init_iters
    from flowforge.training.lipschitz_maintenance import LipschitzMaintenance

    def fresh():
        torch.manual_seed(0)
        layer = SpectralNormLinear(64, 64, coeff=0.9, rtol=1e-9).double()
        with torch.no_grad():
            layer.weight.copy_(_clustered_matrix())
        return layer

    layer = fresh()
    v0 = layer.v.clone()
    assert set_init_iters(layer, 3) == 1
    info = update_lipschitz(layer)
    assert info["power_iterations"] == 3 and info["unconverged"], info
    w = layer.weight.detach()
    v = v0 / v0.norm()
    for _ in range(3):  # three plain power-iteration steps from the same start
        v = w.T @ (w @ v)
        v = v / v.norm()
    assert float((w @ v).norm()) - 1e-12 <= float(layer.sigma) <= 1.0 + 1e-12
    info = update_lipschitz(layer)  # the to-tolerance update refines it
    assert not info["unconverged"] and abs(float(layer.sigma) - 1.0) < 1e-6
    uncapped = fresh()
    assert update_lipschitz(uncapped)["power_iterations"] > 3
    callback, model = LipschitzMaintenance(init_iters=5), fresh()
    callback.on_fit_start(None, SimpleNamespace(model=model))
    assert model.init_iters == 5 and update_lipschitz(model)["power_iterations"] == 5
    for bad in (0, True, 2.5, "3"):
        with pytest.raises(ConfigError, match="lipschitz_init_iters must be null or a positive integer"):
            set_init_iters(layer, bad)
        with pytest.raises(ConfigError, match="lipschitz_init_iters must be null or a positive integer"):
            LipschitzMaintenance(init_iters=bad)
