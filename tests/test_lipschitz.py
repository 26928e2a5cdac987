"""Spectrally normalised (and induced-norm normalised) layers for invertible residual blocks.

References are brute force: SVD of the weight matrix, SVD of the unrolled convolution operator
(:func:`flowforge.testing.conv_operator_matrix`), closed-form 1/inf operator norms of dense matrices, and
random search for mixed (p, q) norms.  Float64 wherever a tolerance is tight.
"""

import math

import pytest
import torch
from torch import nn

from flowforge.errors import ConfigError
from flowforge.nn.induced_norm import InducedNormConv2d, InducedNormLinear
from flowforge.nn.lipschitz import (
    SpectralNormConv2d,
    SpectralNormLinear,
    lipschitz_layers,
    max_normalized_sigma,
    update_lipschitz,
)
from flowforge.testing import (
    conv_operator_matrix,
    exact_lipschitz,
    exact_lipschitz_conv,
    exact_lipschitz_linear,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Power iteration on these tiny operators is thousands of tiny ops: with intra-op threads on a loaded
    machine (``-n 2`` on 2 cores) every op can stall on a descheduled worker thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scaled(layer, factor):
    with torch.no_grad():
        layer.weight.mul_(factor)
    return layer


def _raw_exact(layer) -> float:
    """Exact 2-norm of the layer's *raw* (unnormalised) operator."""
    w = layer.weight
    if w.dim() == 4 and w.shape[-1] > 1:
        return exact_lipschitz_conv(w, layer.input_size, layer.padding, layer.stride)
    return exact_lipschitz_linear(w)


def _make(kind, coeff=0.97, dtype=F64, **kw):
    if kind == "linear":
        layer = SpectralNormLinear(5, 8, coeff=coeff, **kw)
    elif kind == "conv1x1":
        layer = SpectralNormConv2d(4, 8, 1, coeff=coeff, **kw)
    elif kind == "conv3x3":
        layer = SpectralNormConv2d(4, 8, 3, input_size=(6, 6), coeff=coeff, **kw)
    elif kind == "conv3x3_stride2":
        layer = SpectralNormConv2d(3, 5, 3, input_size=(7, 6), stride=2, coeff=coeff, **kw)
    else:
        raise AssertionError(kind)
    return layer.to(dtype)


def _input(layer, batch=3, dtype=F64):
    if isinstance(layer, (SpectralNormLinear, InducedNormLinear)):
        return torch.randn(batch, layer.in_features, dtype=dtype)
    size = layer.input_size or (5, 5)
    return torch.randn(batch, layer.in_channels, *size, dtype=dtype)


# ------------------------------------------------------------------------------------------ power iteration
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "conv3x3_stride2"])
def test_power_iteration_converges_to_exact_operator_norm(kind):
    layer = _scaled(_make(kind), 4.0)
    layer.power_iteration(rtol=1e-9, max_iters=20000)
    if kind == "conv1x1":  # the unrolled operator at any size has the channel matrix's norm
        exact = exact_lipschitz_conv(layer.weight, (6, 6), padding=0)
        assert abs(exact - exact_lipschitz_linear(layer.weight)) <= 1e-10 * exact
    else:
        exact = _raw_exact(layer)
    sigma = float(layer.sigma)
    assert abs(sigma - exact) <= 1e-6 * exact, f"power iteration {sigma} vs exact {exact} (rtol 1e-6)"
    # sigma_hat (the differentiable estimate used for normalisation) agrees with the buffer
    assert abs(float(layer.sigma_hat().detach()) - sigma) <= 1e-9 * exact


def test_conv_uses_true_operator_not_reshaped_kernel():
    layer = _scaled(_make("conv3x3"), 4.0)
    layer.power_iteration(rtol=1e-9, max_iters=20000)
    exact = exact_lipschitz_conv(layer.weight, (6, 6), padding=1)
    naive = exact_lipschitz_linear(layer.weight.reshape(8, -1))  # ||reshape(W, (out, in*k*k))||_2
    assert abs(naive - exact) > 0.05 * exact, "test needs a kernel whose reshaped norm differs from the operator norm"
    assert abs(float(layer.sigma) - exact) <= 1e-6 * exact
    # the operator (hence the estimate) depends on the input size: same kernel at 3x3 gives another norm
    small = SpectralNormConv2d(4, 8, 3, input_size=(3, 3)).to(F64)
    small.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")}, strict=False)
    small.power_iteration(rtol=1e-9, max_iters=20000)
    exact_small = exact_lipschitz_conv(layer.weight, (3, 3), padding=1)
    assert abs(exact_small - exact) > 1e-3 * exact
    assert abs(float(small.sigma) - exact_small) <= 1e-6 * exact_small


def test_power_iteration_warm_start_and_return_value():
    layer = _scaled(_make("linear"), 3.0)
    first = layer.power_iteration(rtol=1e-10, max_iters=500)
    assert first > 3
    assert layer.power_iteration(rtol=1e-6) == 1, "a converged warm start must stop after one iteration"
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    assert layer.power_iteration(rtol=1e-10, max_iters=500) > 1


# ------------------------------------------------------------------------------------- norm bound after training
@pytest.mark.parametrize("coeff", [0.9, 0.98])
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_norm_at_most_coeff_after_training(kind, coeff):
    torch.manual_seed(1)
    if kind == "linear":
        model = nn.Sequential(SpectralNormLinear(6, 12, coeff=coeff), nn.ELU(), SpectralNormLinear(12, 6, coeff=coeff))
        x = torch.randn(32, 6, dtype=F64)
    else:
        k = 1 if kind == "conv1x1" else 3
        size = None if k == 1 else (6, 6)
        model = nn.Sequential(
            SpectralNormConv2d(3, 8, k, input_size=size, coeff=coeff),
            nn.ELU(),
            SpectralNormConv2d(8, 3, k, input_size=size, coeff=coeff),
        )
        x = torch.randn(8, 3, 6, 6, dtype=F64)
    model = model.to(F64)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(15):
        loss = -model(x).pow(2).mean()  # pushes the weights to grow
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_lipschitz(model)  # as after every optimiser step in training
    report = update_lipschitz(model, rtol=1e-6, max_iters=2000)
    assert report["num_layers"] == 2
    for layer in lipschitz_layers(model):
        raw = _raw_exact(layer)
        assert raw > 1.2 * coeff, f"training should have pushed the raw norm ({raw}) above coeff={coeff}"
        exact = exact_lipschitz(layer)
        assert exact <= coeff * (1 + 1e-4), f"normalised norm {exact} exceeds coeff={coeff} by more than rel 1e-4"
        assert exact >= coeff * (1 - 1e-3), f"normalised norm {exact} should be tight at coeff={coeff}"
    assert max_normalized_sigma(model) <= coeff * (1 + 1e-12)


def test_soft_normalisation_leaves_small_weights_unchanged():
    for kind in ("linear", "conv3x3"):
        layer = _make(kind, coeff=0.9)
        layer.power_iteration(rtol=1e-9, max_iters=5000)
        _scaled(layer, 0.5 * 0.9 / float(layer.sigma))  # raw norm 0.45 < coeff
        assert _raw_exact(layer) < 0.9
        assert torch.equal(layer.normalized_weight(), layer.weight)
        _scaled(layer, 10.0)  # raw norm 4.5 > coeff: now it is rescaled to coeff
        assert not torch.equal(layer.normalized_weight(), layer.weight)
        assert abs(exact_lipschitz(layer) - 0.9) <= 1e-4 * 0.9  # power-iteration accuracy (clustered conv spectrum)


# ------------------------------------------------------------------------------------------- gradients, jvp
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_gradient_through_sigma_hat_matches_finite_differences(kind):
    layer = _scaled(_make(kind, coeff=0.9), 5.0)
    if kind == "conv3x3":  # keep gradcheck small: 2 -> 3 channels at 4x4
        layer = _scaled(SpectralNormConv2d(2, 3, 3, input_size=(4, 4), coeff=0.9).to(F64), 5.0)
    layer.power_iteration(rtol=1e-9, max_iters=5000)
    assert float(layer.sigma) > 0.9, "normalisation must be active for this test"
    x = _input(layer, batch=2)
    bias = layer.bias.detach()

    def f(weight):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,)).sum()

    w = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # the gradient really contains the d sigma_hat / dW term (u, v fixed): dropping it changes the gradient
    (g_full,) = torch.autograd.grad(f(w), w)
    factor = float(layer.sigma_hat().detach()) / 0.9
    w2 = w.detach().clone().requires_grad_(True)
    (g_frozen,) = torch.autograd.grad(layer._layer_map(x, w2 / factor, bias).sum(), w2)
    assert (g_full - g_frozen).abs().max() > 1e-3 * g_frozen.abs().max()
    # buffers are not touched by forward/backward
    u = layer.u.clone()
    f(w).backward()
    assert torch.equal(layer.u, u)


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "conv3x3_stride2"])
def test_linear_part_is_the_jacobian_vector_product(kind):
    layer = _scaled(_make(kind), 3.0)
    layer.power_iteration()
    with torch.no_grad():
        layer.bias.uniform_(0.5, 1.0)
    x, t = _input(layer), _input(layer)
    _, jvp = torch.func.jvp(layer, (x,), (t,))
    lin = layer.linear_part(t)
    assert torch.allclose(lin, jvp, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(lin, layer(t)), "linear_part must exclude the bias"
    (grad,) = torch.autograd.grad(lin.pow(2).sum(), layer.weight)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_uninitialised_layer_inside_torch_func_gives_clear_error():
    layer = _make("linear")
    x = _input(layer)
    with pytest.raises(ConfigError, match="update_lipschitz"):
        torch.func.jvp(layer, (x,), (x,))
    layer(x)  # an ordinary forward initialises it; then jvp works
    torch.func.jvp(layer, (x,), (x,))


def test_weight_averaging_of_buffers():
    """EMA (AveragedModel with use_buffers) averages u, v, sigma, initialized, input_hw: the averaged layer stays
    initialised, keeps its size, and averaged u, v that left the unit sphere still give the same normalisation."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = nn.Sequential(
        SpectralNormLinear(4, 4, coeff=0.9), nn.ReLU(), SpectralNormConv2d(1, 1, 3, (4, 4), coeff=0.9)
    ).to(F64)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p)).mul_(1.5)
        update_lipschitz(model)
        ema.update_parameters(model)
    for layer in lipschitz_layers(ema.module):
        assert float(layer.initialized) == 1.0
        reference = layer.normalized_weight().detach()
        with torch.no_grad():
            layer.u.mul_(0.5)  # an average of unit vectors is shorter than 1
            layer.v.mul_(0.7)
        assert torch.allclose(layer.normalized_weight(), reference, rtol=1e-12, atol=0)
    assert ema.module[2].input_hw.tolist() == [4.0, 4.0]
    update_lipschitz(ema.module, rtol=1e-8, max_iters=5000)
    assert max(exact_lipschitz(m) for m in lipschitz_layers(ema.module)) <= 0.9 * (1 + 1e-4)


def test_forward_does_not_update_buffers_and_lazy_init():
    layer = _scaled(_make("conv3x3"), 3.0).eval()
    assert float(layer.initialized) == 0
    x = _input(layer)
    y1 = layer(x)  # first forward initialises u, v (power iteration), even in eval
    assert float(layer.initialized) == 1
    assert abs(float(layer.sigma) - _raw_exact(layer)) <= 5e-3 * _raw_exact(layer)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.inference_mode():
        y2 = layer(x)
    assert torch.equal(y1.detach(), y2)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------- state and config
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_state_dict_round_trip(kind):
    torch.manual_seed(3)
    layer = _scaled(_make(kind), 3.0)
    layer.power_iteration()
    sd = layer.state_dict()
    expected = {"weight", "bias", "u", "v", "sigma", "initialized"} | ({"input_hw"} if kind != "linear" else set())
    assert set(sd) == expected
    torch.manual_seed(4)
    fresh = _make(kind)
    x = _input(layer)
    assert not torch.allclose(fresh(x), layer(x))
    fresh = _make(kind)  # uninitialised again
    fresh.load_state_dict(sd)
    for key in expected:
        assert torch.equal(getattr(fresh, key), getattr(layer, key)), key
    assert float(fresh.initialized) == 1
    assert torch.equal(fresh(x), layer(x))
    if kind == "conv3x3":
        assert layer.input_hw.tolist() == [6.0, 6.0]
        other = SpectralNormConv2d(4, 8, 3, input_size=(5, 5)).to(F64)
        with pytest.raises(ConfigError, match=r"\(6, 6\)"):
            other.load_state_dict(sd)


def test_parameter_counts_match_torch_layers():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    for bias in (True, False):
        assert count(SpectralNormLinear(7, 5, bias=bias)) == count(nn.Linear(7, 5, bias=bias))
        assert count(InducedNormLinear(7, 5, bias=bias, domain=1.5)) == count(nn.Linear(7, 5, bias=bias))
        for k in (1, 3):
            ref = count(nn.Conv2d(4, 6, k, bias=bias))
            assert count(SpectralNormConv2d(4, 6, k, input_size=(5, 5), bias=bias)) == ref
            assert count(InducedNormConv2d(4, 6, k, input_size=(5, 5), bias=bias, codomain=3.0)) == ref
    assert {n for n, _ in SpectralNormConv2d(4, 6, 3, input_size=(5, 5)).named_parameters()} == {"weight", "bias"}
    assert count(InducedNormLinear(7, 5, learn_p=True)) == count(nn.Linear(7, 5)) + 2


def test_initialisation_like_torch_and_zero_init():
    torch.manual_seed(0)
    layer = SpectralNormLinear(50, 40)
    bound = 1 / math.sqrt(50)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound  # kaiming_uniform(a=sqrt 5)
    assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.8 * bound
    for z in (SpectralNormLinear(6, 4, zero_init=True), SpectralNormConv2d(3, 5, 3, input_size=(5, 5), zero_init=True)):
        fan_in = z.weight[0].numel()
        assert torch.equal(z.bias, torch.zeros_like(z.bias))
        assert 0 < z.weight.abs().max() <= 1e-3 / math.sqrt(fan_in)
        z = z.to(F64)
        z.power_iteration(rtol=1e-10, max_iters=20000)
        assert abs(float(z.sigma) - _raw_exact(z)) <= 1e-6 * _raw_exact(z)
        assert torch.equal(z.normalized_weight(), z.weight)  # tiny weights are left alone


@pytest.mark.parametrize("coeff", [1.0, 1.5, 0.0, -0.1])
@pytest.mark.parametrize("cls", [SpectralNormLinear, InducedNormLinear])
def test_bad_coeff_raises(cls, coeff):
    with pytest.raises(ConfigError, match="coeff"):
        cls(3, 3, coeff=coeff)
    with pytest.raises(ConfigError, match="coeff"):
        SpectralNormConv2d(3, 3, 3, input_size=(4, 4), coeff=coeff)


def test_conv_input_size_errors():
    with pytest.raises(ConfigError, match="input_size"):
        SpectralNormConv2d(3, 4, 3)
    with pytest.raises(ConfigError, match="input_size"):
        InducedNormConv2d(3, 4, 3)
    SpectralNormConv2d(3, 4, 1)  # 1x1: the norm does not depend on the size
    layer = SpectralNormConv2d(3, 4, 3, input_size=(6, 6))
    with pytest.raises(ConfigError, match=r"\(6, 6\).*\(8, 8\)"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="padding"):
        SpectralNormConv2d(3, 4, 3, input_size=(6, 6), padding=3)


# ---------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_bfloat16_keeps_power_iteration_in_float32(kind):
    torch.manual_seed(5)
    layer = _scaled(_make(kind, dtype=torch.float32), 3.0)
    layer.power_iteration()
    u_before = layer.u.clone()
    layer = layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    for name in ("u", "v", "sigma", "initialized"):
        assert getattr(layer, name).dtype == torch.float32, name
    assert torch.equal(layer.u, u_before), "casting the module must not round u"
    layer.power_iteration(rtol=1e-6, max_iters=2000)
    assert layer.u.dtype == torch.float32 and layer.v.dtype == torch.float32
    exact = _raw_exact(layer)  # float64 norm of the bf16 weight
    assert abs(float(layer.sigma) - exact) <= 1e-2 * exact, f"bf16 sigma {float(layer.sigma)} vs exact {exact}"
    y = layer(_input(layer, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert exact_lipschitz(layer) <= 0.97 * 1.01


def test_autocast_does_not_lower_the_norm_precision():
    layer = _scaled(SpectralNormLinear(64, 64), 3.0)
    layer.power_iteration()
    reference = layer.normalized_weight()
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16  # autocast would lower matmuls ...
        assert layer.sigma_hat().dtype == torch.float32  # ... but not the norm estimate
        assert torch.equal(layer.normalized_weight(), reference)
        layer.power_iteration()
    assert layer.u.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- helpers
def test_update_lipschitz_report_and_helpers():
    a = _scaled(SpectralNormLinear(4, 6, coeff=0.9), 4.0)
    b = _scaled(SpectralNormConv2d(2, 2, 3, input_size=(4, 4), coeff=0.95), 0.05)
    c = _scaled(InducedNormLinear(6, 4, domain=1.5, codomain=3.0), 0.05)
    model = nn.ModuleDict({"a": a, "plain": nn.Linear(3, 3), "block": nn.Sequential(b, nn.ReLU(), c)}).to(F64)
    assert lipschitz_layers(model) == [a, b, c]
    report = update_lipschitz(model, rtol=1e-8, max_iters=5000)
    assert report["num_layers"] == 3
    assert report["max_sigma"] == max(float(m.sigma) for m in (a, b, c))
    assert abs(report["max_sigma"] - exact_lipschitz_linear(a.weight)) <= 1e-5 * report["max_sigma"]
    assert report["power_iterations"] >= 1 and isinstance(report["power_iterations"], int)
    assert abs(max_normalized_sigma(model) - 0.9) <= 1e-6  # a is the only layer with an active constraint
    assert update_lipschitz(nn.Sequential(nn.Linear(2, 2))) == {}
    assert max_normalized_sigma(nn.Linear(2, 2)) == 0.0
    assert "coeff=0.9" in repr(a) and "input_size=(4, 4)" in repr(b) and "domain=1.5" in repr(c)


# ------------------------------------------------------------------------------------------- induced norms
def _dense(layer) -> torch.Tensor:
    w = layer.weight.detach().to(F64)
    if w.dim() == 4 and w.shape[-1] > 1:
        return conv_operator_matrix(w, layer.input_size, layer.stride, layer.padding)
    return w.reshape(w.shape[0], -1)


def _closed_form(m: torch.Tensor, p: float, q: float) -> float:
    """||M||_{1->q} = max column q-norm, ||M||_{p->inf} = max row p*-norm (dense reference)."""
    if p == 1:
        return float(torch.linalg.vector_norm(m, ord=q, dim=0).max())
    p_star = math.inf if p == 1 else (1.0 if math.isinf(p) else p / (p - 1))
    return float(torch.linalg.vector_norm(m, ord=p_star, dim=1).max())


def _brute_force_lower_bound(m: torch.Tensor, p: float, q: float, samples: int = 20000, refine: int = 16) -> float:
    """max ||M v||_q / ||v||_p over random directions, the best ``refine`` of them polished by gradient ascent."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(samples, m.shape[1], generator=g, dtype=F64)
    ratio = torch.linalg.vector_norm(v @ m.t(), ord=q, dim=1) / torch.linalg.vector_norm(v, ord=p, dim=1)
    best = ratio.topk(refine).indices
    x = v[best].clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1e-2)
    for _ in range(300):
        r = torch.linalg.vector_norm(x @ m.t(), ord=q, dim=1) / torch.linalg.vector_norm(x, ord=p, dim=1)
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    with torch.no_grad():
        r = torch.linalg.vector_norm(x @ m.t(), ord=q, dim=1) / torch.linalg.vector_norm(x, ord=p, dim=1)
    return max(float(ratio.max()), float(r.max()))


def _hoelder_upper_bound(m: torch.Tensor, p: float, q: float) -> float:
    """||Mv||_q <= sum_j |v_j| ||M e_j||_q <= ||v||_p ||(||M e_j||_q)_j||_{p*}, and
    ||Mv||_q = ||(<m_i, v>)_i||_q <= ||v||_p ||(||m_i||_{p*})_i||_q (Hoelder on each row)."""
    p_star = math.inf if p == 1 else (1.0 if math.isinf(p) else p / (p - 1))
    cols = torch.linalg.vector_norm(m, ord=q, dim=0)
    rows = torch.linalg.vector_norm(m, ord=p_star, dim=1)
    return min(float(torch.linalg.vector_norm(cols, ord=p_star)), float(torch.linalg.vector_norm(rows, ord=q)))


def _induced(kind, **kw):
    if kind == "linear":
        return InducedNormLinear(5, 7, **kw).to(F64)
    if kind == "conv1x1":
        return InducedNormConv2d(3, 4, 1, **kw).to(F64)
    if kind == "conv3x3_stride2":
        return InducedNormConv2d(2, 3, 3, input_size=(5, 4), stride=2, **kw).to(F64)
    return InducedNormConv2d(2, 3, 3, input_size=(4, 4), **kw).to(F64)


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "conv3x3_stride2"])
def test_induced_2_to_2_equals_spectral_norm(kind):
    layer = _scaled(_induced(kind, domain=2.0, codomain=2.0), 3.0)
    layer.power_iteration(rtol=1e-9, max_iters=20000)
    exact = float(torch.linalg.matrix_norm(_dense(layer), ord=2))
    assert abs(float(layer.sigma) - exact) <= 1e-6 * exact
    assert abs(float(layer.sigma_hat().detach()) - exact) <= 1e-6 * exact
    assert abs(exact_lipschitz(layer) - 0.97) <= 1e-5


@pytest.mark.parametrize(
    "p,q", [(1.0, 1.0), (math.inf, math.inf), (1.0, 2.0), (2.0, math.inf), (1.0, math.inf), (1.0, 3.0), (1.5, math.inf)]
)
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "conv3x3_stride2"])
def test_induced_closed_forms_match_dense_operator(kind, p, q):
    layer = _induced(kind, domain=p, codomain=q, coeff=0.9)
    assert layer.power_iteration() == 0
    _scaled(layer, 2.0 / float(layer.sigma))  # norm 2 > coeff
    assert layer.power_iteration() == 0
    m = _dense(layer)
    exact = _closed_form(m, p, q)
    if (p, q) == (1.0, 1.0):
        assert abs(exact - float(torch.linalg.matrix_norm(m, ord=1))) <= 1e-12 * exact
    if (p, q) == (math.inf, math.inf):
        assert abs(exact - float(torch.linalg.matrix_norm(m, ord=math.inf))) <= 1e-12 * exact
    assert abs(float(layer.sigma) - exact) <= 1e-10 * exact, f"{p}->{q}: {float(layer.sigma)} vs {exact}"
    assert exact > 0.9
    normalised = _closed_form(_dense_normalised(layer), p, q)
    assert abs(normalised - 0.9) <= 1e-10, f"normalised {p}->{q} norm {normalised} should equal coeff 0.9"


def _dense_normalised(layer) -> torch.Tensor:
    w = layer.normalized_weight().detach()
    if w.dim() == 4 and w.shape[-1] > 1:
        return conv_operator_matrix(w, layer.input_size, layer.stride, layer.padding)
    return w.reshape(w.shape[0], -1)


# (p, q, tolerance of the brute-force comparison).  The generalised power method finds a local maximum of a
# non-concave problem (2 -> 1 and inf -> q norms are NP-hard in general); restarts at the first call make it
# global in the well-conditioned cases (1e-3), while the hard orders are only checked to 5%.
ORDERS = [(1.5, 3.0, 1e-3), (3.0, 1.5, 1e-3), (4.0, 4.0 / 3.0, 1e-3), (2.0, 1.0, 5e-2), (math.inf, 2.0, 5e-2)]


@pytest.mark.parametrize("p,q,tol", ORDERS)
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_induced_general_orders_against_brute_force(kind, p, q, tol):
    layer = _scaled(_induced(kind, domain=p, codomain=q, coeff=0.9), 3.0)
    layer.power_iteration(rtol=1e-10, max_iters=5000)
    m = _dense(layer)
    sigma = float(layer.sigma)
    lower = _brute_force_lower_bound(m, p, q)
    upper = _hoelder_upper_bound(m, p, q)
    assert lower <= upper * (1 + 1e-9)
    assert sigma >= lower * (1 - tol), f"{p}->{q}: estimate {sigma} below brute-force lower bound {lower} (rel {tol})"
    assert sigma <= upper * (1 + 1e-9), f"{p}->{q}: estimate {sigma} above Hoelder upper bound {upper}"
    # the estimate is attained by the stored direction v (so it is a true lower bound of the norm)
    v = layer.v.reshape(-1)
    attained = float(torch.linalg.vector_norm(m @ v, ord=q) / torch.linalg.vector_norm(v, ord=p))
    assert abs(attained - sigma) <= 1e-9 * sigma
    # after normalisation: the stored direction attains coeff, and random search finds nothing above it
    m_hat = _dense_normalised(layer)
    at_v = float(torch.linalg.vector_norm(m_hat @ v, ord=q) / torch.linalg.vector_norm(v, ord=p))
    assert abs(at_v - 0.9) <= 1e-9
    assert _brute_force_lower_bound(m_hat, p, q) <= 0.9 * (1 + 1e-3)


def test_induced_learned_orders():
    torch.manual_seed(6)
    layer = _scaled(InducedNormLinear(5, 6, coeff=0.9, learn_p=True), 4.0).to(F64)
    assert isinstance(layer.domain, torch.Tensor) and isinstance(layer.codomain, torch.Tensor)
    assert abs(layer.domain.item() - 2.0) <= 1e-6 and abs(layer.codomain.item() - 2.0) <= 1e-6
    assert isinstance(InducedNormLinear(5, 6).domain, float)
    layer.power_iteration(rtol=1e-9, max_iters=5000)
    assert abs(float(layer.sigma) - exact_lipschitz_linear(layer.weight)) <= 1e-6 * float(layer.sigma)
    x = torch.randn(8, 5, dtype=F64)
    layer(x).pow(2).sum().backward()
    for raw in (layer.raw_domain, layer.raw_codomain):
        assert raw.grad is not None and torch.isfinite(raw.grad) and raw.grad.abs() > 1e-6
    # d sigma_hat / d(raw orders, weight) against finite differences
    probe = _SigmaHat(layer)

    def f(raw_p, raw_q, weight):
        params = {"layer.raw_domain": raw_p, "layer.raw_codomain": raw_q, "layer.weight": weight}
        return torch.func.functional_call(probe, params, ())

    args = tuple(t.detach().clone().requires_grad_(True) for t in (layer.raw_domain, layer.raw_codomain, layer.weight))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    # an input feature the weight ignores gives v a zero entry: d/dp of 0^p must stay finite (not 0 * log 0)
    with torch.no_grad():
        layer.weight[:, 0] = 0.0
    layer.power_iteration(rtol=1e-9, max_iters=5000)
    assert float(layer.v[0]) == 0.0
    layer.raw_domain.grad = None
    layer.sigma_hat().backward()
    assert torch.isfinite(layer.raw_domain.grad) and torch.isfinite(layer.raw_codomain.grad)
    # the orders stay inside (1, 5) whatever the raw values
    with torch.no_grad():
        layer.raw_domain.fill_(-8.0)
        layer.raw_codomain.fill_(8.0)
    assert 1.0 < layer.domain.item() < 1.01 and 4.99 < layer.codomain.item() < 5.0
    n = layer.power_iteration(rtol=1e-9, max_iters=5000)
    assert n >= 1 and math.isfinite(float(layer.sigma))
    m = layer.weight.detach()
    p, q = layer.domain.item(), layer.codomain.item()
    assert float(layer.sigma) >= _brute_force_lower_bound(m, p, q) * (1 - 1e-3)


class _SigmaHat(nn.Module):
    """Wraps a layer so that ``functional_call`` can differentiate its ``sigma_hat``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.sigma_hat()


def test_induced_config_errors():
    with pytest.raises(ConfigError, match="domain"):
        InducedNormLinear(3, 3, domain=0.5)
    with pytest.raises(ConfigError, match="codomain"):
        InducedNormLinear(3, 3, codomain=float("nan"))
    with pytest.raises(ConfigError, match=r"\(1, 5\)"):
        InducedNormLinear(3, 3, domain=1.0, learn_p=True)
    with pytest.raises(ConfigError, match=r"\(1, 5\)"):
        InducedNormConv2d(3, 3, 3, input_size=(4, 4), codomain=6.0, learn_p=True)


def _clustered_matrix(n=64, dtype=torch.float64):
    """A matrix with top singular values 1.0 and 0.999, the rest <= 0.6 (a worst case for power iteration)."""
    g = torch.Generator().manual_seed(3)
    q1 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))[0]
    q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))[0]
    s = torch.cat([torch.tensor([1.0, 0.999], dtype=dtype), torch.linspace(0.6, 0.1, n - 2, dtype=dtype)])
    return q1 @ torch.diag(s) @ q2.T


def test_block_power_iteration_resolves_clustered_top_singular_values():
    """Subspace iteration (power_block=4) reaches sigma_1 where plain power iteration, with the same cap,
    stalls between the two clustered top values (rate (0.999)^2 per iteration)."""
    w = _clustered_matrix()
    results = {}
    for block in (1, 4):
        layer = SpectralNormLinear(64, 64, coeff=0.9, rtol=1e-9, max_iters=100).double()
        layer.power_block = block
        layer.power_iteration()  # the first estimate (Lanczos) on the initial weight
        with torch.no_grad():
            layer.weight.copy_(w)
        iters = layer.power_iteration()
        results[block] = (float(layer.sigma), iters)
    sigma4, iters4 = results[4]
    assert abs(sigma4 - 1.0) < 1e-9 and iters4 < 100, results
    assert 1.0 - results[1][0] > 1e-6, f"plain power iteration should stall here: {results}"


def test_block_power_iteration_conv_and_warm_start_after_reload():
    torch.manual_seed(0)
    layer = SpectralNormConv2d(3, 5, 3, input_size=(6, 6), coeff=0.9, rtol=1e-8, max_iters=500).double()
    layer.power_iteration()
    exact = exact_lipschitz_conv(layer.weight.detach(), (6, 6), padding=1)
    assert abs(float(layer.sigma) - exact) < 1e-6 * exact
    assert layer.power_iteration() <= 2  # warm start on an unchanged weight
    fresh = SpectralNormConv2d(3, 5, 3, input_size=(6, 6), coeff=0.9, rtol=1e-8, max_iters=500).double()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.power_iteration() <= 3  # the stored top pair is already converged; the subspace is rebuilt
    assert abs(float(fresh.sigma) - exact) < 1e-6 * exact


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_subspace_state_round_trip_gives_the_same_next_iteration(kind):
    """A fresh layer given the state dict and the subspace of another continues exactly as the original."""

    def make():
        if kind == "linear":
            return SpectralNormLinear(64, 64, coeff=0.9, rtol=1e-9, max_iters=7).double()
        return SpectralNormConv2d(3, 5, 3, input_size=(6, 6), coeff=0.9, rtol=1e-9, max_iters=7).double()

    torch.manual_seed(0)
    layer = make()
    layer.power_iteration()  # the first estimate (Lanczos); then the block iteration on a changed weight
    with torch.no_grad():
        if kind == "linear":
            layer.weight.copy_(_clustered_matrix())
        else:
            layer.weight.add_(0.3 * torch.randn(layer.weight.shape, dtype=F64))
    layer.power_iteration()  # capped: the subspace carries what the next call continues from
    state = layer.subspace_state()
    assert state is not None and state.shape[0] == layer.power_block
    fresh, without = make(), make()
    fresh.load_state_dict(layer.state_dict())
    without.load_state_dict(layer.state_dict())
    assert fresh.subspace_state() is None  # nothing stored yet, and a loaded v is not the one it was built on
    fresh.load_subspace_state(state.float())  # converted to the precision of the iteration
    assert fresh.subspace_state().dtype == F64
    fresh.load_subspace_state(state)

    results = []
    for m in (layer, fresh, without):
        iters = m.power_iteration()
        results.append((iters, m.u.clone(), m.v.clone(), m.sigma.clone()))
    (i0, u0, v0, s0), (i1, u1, v1, s1), (i2, u2, v2, s2) = results
    assert i0 == i1 and torch.equal(u0, u1) and torch.equal(v0, v1) and torch.equal(s0, s1)
    assert not (torch.equal(v0, v2) and torch.equal(s0, s2)), "the test needs the subspace to matter"


def test_subspace_state_is_none_when_stale_and_load_checks_the_shape():
    layer = SpectralNormLinear(8, 6, coeff=0.9)
    assert layer.subspace_state() is None  # never iterated
    layer.power_iteration()  # the first estimate (Lanczos) leaves its leading right Ritz vectors, v first
    ritz = layer.subspace_state()
    assert ritz.shape == (4, 8) and torch.equal(ritz[0], layer.v)
    torch.testing.assert_close(ritz @ ritz.T, torch.eye(4), atol=1e-5, rtol=0)
    layer.power_iteration()
    basis = layer.subspace_state()
    assert basis.shape == (4, 8)
    with torch.no_grad():
        layer.v.mul_(1.0)  # any in-place change of v
    assert layer.subspace_state() is None
    with pytest.raises(ConfigError, match=r"shape \(4, 8\).*got \(3, 8\)"):
        layer.load_subspace_state(basis[:3])
    with pytest.raises(ConfigError, match="shape"):
        layer.load_subspace_state(basis.reshape(8, 4))
    layer.load_subspace_state(basis)
    assert torch.equal(layer.subspace_state(), basis)


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3_stride2"])
def test_grouped_power_iteration_equals_one_layer_at_a_time(kind):
    """update_lipschitz iterates layers of one geometry together; each ends where it would alone, with
    u^T A v = +sigma, and a warm start on unchanged weights stops after one iteration for the whole group."""

    def make():
        if kind == "linear":
            return SpectralNormLinear(7, 5, coeff=0.9)
        if kind == "conv1x1":
            return SpectralNormConv2d(3, 4, 1, coeff=0.9)
        return SpectralNormConv2d(2, 3, 3, input_size=(5, 4), stride=2, coeff=0.9)

    torch.manual_seed(0)
    grouped = nn.Sequential(*[_scaled(make(), 1.0 + i) for i in range(3)]).to(F64)
    alone = [make().to(F64) for _ in range(3)]
    for a, g in zip(alone, grouped):
        a.load_state_dict(g.state_dict())
    update_lipschitz(grouped, rtol=1e-10, max_iters=5000)
    for a, g in zip(alone, grouped):
        a.power_iteration(rtol=1e-10, max_iters=5000)
        exact = _raw_exact(g)
        assert abs(float(g.sigma) - exact) <= 1e-9 * exact and abs(float(a.sigma) - exact) <= 1e-9 * exact
        torch.testing.assert_close(g.v, a.v, atol=1e-6, rtol=0)
        torch.testing.assert_close(g.u, a.u, atol=1e-6, rtol=0)
        w = g.weight.detach()
        assert float((g.u * g._op(g.v, w)).sum()) == pytest.approx(float(g.sigma), rel=1e-9)
    assert update_lipschitz(grouped, rtol=1e-6)["power_iterations"] == 1
    for flip in (-1.0, -1.0):  # (u, v) and (-u, -v) are the same pair: v keeps its sign, so averages stay meaningful
        with torch.no_grad():
            for g in grouped:
                g.u.mul_(flip)
                g.v.mul_(flip)
        before = [g.v.clone() for g in grouped]
        update_lipschitz(grouped)
        assert all(float((g.v * v).sum()) > 0.99 for g, v in zip(grouped, before))


# ---------------------------------------------------------------------------------------- compiled forward
@pytest.mark.parametrize(
    "make",
    [
        lambda: SpectralNormLinear(6, 5),
        lambda: SpectralNormConv2d(4, 5, 1),
        lambda: SpectralNormConv2d(4, 5, 3, input_size=(6, 6)),
        lambda: InducedNormLinear(6, 5, domain=1.5, codomain=3.0),
        lambda: InducedNormLinear(6, 5, domain=1.5, codomain=3.0, learn_p=True),
        lambda: InducedNormConv2d(4, 5, 3, input_size=(6, 6), domain=2.0, codomain=2.5),
    ],
    ids=["linear", "conv1x1", "conv3x3", "induced_linear", "induced_learned", "induced_conv3x3"],
)
def test_initialised_forward_traces_without_host_reads(make):
    """Once initialised, the training forward and backward trace into one graph (no host read of the
    ``initialized`` flag or of any other tensor) and give the eager result."""
    torch.manual_seed(0)
    layer = make().train()
    x = _input(layer, dtype=torch.float32)
    assert not layer._is_initialized()
    update_lipschitz(layer)
    assert layer._is_initialized()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    expected = layer(x)
    expected.square().sum().backward()
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, layer.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_ready_flag_follows_the_loaded_buffer():
    """The Python flag the forward branches on mirrors ``initialized`` through ``load_state_dict``: a layer that
    loads an initialised state does not re-run its power iteration, one that loads an uninitialised state does."""
    torch.manual_seed(1)
    layer = _scaled(_make("conv3x3"), 3.0)
    blank = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.power_iteration()
    fresh = _make("conv3x3")
    assert not fresh._is_initialized()
    fresh.load_state_dict(layer.state_dict())
    assert fresh._is_initialized()
    layer.load_state_dict(blank)
    assert not layer._is_initialized()
    layer(_input(layer))  # the forward initialises it again
    assert layer._is_initialized() and float(layer.initialized) == 1.0


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_sigma_direction_follows_buffers_swapped_through_data(kind):
    """Weight averaging swaps buffers through ``.data`` (no version bump): after ``forget_sigma_direction`` (which
    the Lipschitz callback calls before every training step and evaluation) sigma_hat is u^T A(W) v of the
    swapped-in u, v."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = SpectralNormLinear(6, 5, coeff=0.9).double()
    else:
        layer = SpectralNormConv2d(2, 3, 3, input_size=(5, 5), coeff=0.9).double()
    layer.power_iteration()
    before = float(layer.sigma_hat())
    other_u, other_v = torch.randn_like(layer.u), torch.randn_like(layer.v)
    layer.u.data.copy_(other_u / other_u.norm())
    layer.v.data.copy_(other_v / other_v.norm())
    w = layer.weight.detach()
    expected = abs(float((layer.u * layer._op(layer.v, w)).sum()))
    assert float(layer.sigma_hat()) == pytest.approx(before)  # stale: the versions did not change
    layer.forget_sigma_direction()
    assert float(layer.sigma_hat()) == pytest.approx(expected, rel=1e-12)
    assert abs(expected - before) > 1e-3


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_group_update_stores_the_sigma_direction_the_layer_would_compute(kind):
    """update_lipschitz's batched subspace iteration stores every updated layer's ``M = u v^T`` (sigma_hat's
    direction) with the new buffers; it equals what the layer computes from those buffers itself, and a weight
    that is exactly zero (buffers left as they were) is not given one."""
    torch.manual_seed(0)
    if kind == "linear":
        layers = nn.Sequential(*[SpectralNormLinear(7, 5, coeff=0.9) for _ in range(3)]).double()
    else:
        layers = nn.Sequential(*[SpectralNormConv2d(4, 3, 1, input_size=(3, 3), coeff=0.9) for _ in range(3)])
        layers = layers.double()
    update_lipschitz(layers)  # first estimates (Lanczos, one by one)
    with torch.no_grad():
        for layer in layers:
            layer.weight.add_(0.1 * torch.randn_like(layer.weight))
        layers[2].weight.zero_()
    update_lipschitz(layers)  # the group's block iteration
    for i, layer in enumerate(layers):
        cached = layer._sigma_direction_cache.get((layer.u, layer.v), extra=torch.float64)
        if i == 2:
            assert cached is None
            continue
        assert cached is not None
        layer.forget_sigma_direction()
        torch.testing.assert_close(cached, layer.sigma_direction(), rtol=0, atol=1e-15)
        assert cached.shape == layer.weight.shape
