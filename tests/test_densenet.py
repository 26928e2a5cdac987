"""i-DenseNet's g: measured Lipschitz constants against the bound, the frozen-derivative linearisation,
the learnable concatenation weights, shapes and argument checks."""

import pytest
import torch

from flowforge.errors import ConfigError
from flowforge.estimators.logdet import LogDetEstimator
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.densenet import DenseLayer, DenseNet, dense_convnet, dense_mlp, set_concat_weights_learnable
from flowforge.nn.lipschitz import SpectralNormConv2d, SpectralNormLinear, lipschitz_layers, update_lipschitz

F64 = torch.float64


def _strengthen(g, factor=5.0):
    """Scale the raw weights up so that every spectral normalisation is active (norm == coeff), then
    converge the power iterations."""
    with torch.no_grad():
        for layer in lipschitz_layers(g):
            layer.weight.mul_(factor)
    for _ in range(4):
        update_lipschitz(g)
    return g


def per_sample_jacobians(f, x):
    """``(N, out_numel, in_numel)`` Jacobians of a batch-independent ``f`` (one backward pass per output
    coordinate, for the whole batch at once)."""
    x = x.detach().requires_grad_(True)
    y = f(x).reshape(x.shape[0], -1)
    rows = [
        torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0].reshape(x.shape[0], -1) for i in range(y.shape[1])
    ]
    return torch.stack(rows, dim=1)


def max_jacobian_norm(f, x):
    """Largest spectral norm of the Jacobian over the batch ``x`` (a lower bound of Lip(f))."""
    return float(torch.linalg.matrix_norm(per_sample_jacobians(f, x), 2).max())


def test_mlp_lipschitz_below_bound():
    torch.manual_seed(0)
    g = _strengthen(dense_mlp(4, depth=3, growth=16, zero_last=False, sn_rtol=1e-8).double())
    assert len(lipschitz_layers(g)) == 4  # discoverable by update_lipschitz
    assert g.lipschitz_bound == pytest.approx(0.98 * 0.98**3)
    x = torch.randn(256, 4, dtype=F64) * 2
    lip = max_jacobian_norm(g, x)
    assert 0.05 < lip <= g.lipschitz_bound * (1 + 1e-6), lip
    # each dense layer alone: Lip <= lip_coeff, and nearly attained (the bound is tight per layer)
    for layer in list(g)[:3]:
        xin = torch.randn(256, layer.layer.in_features, dtype=F64) * 2
        lip_layer = max_jacobian_norm(layer, xin)
        assert 0.9 < lip_layer <= 0.98 * (1 + 1e-6), lip_layer


def test_conv_lipschitz_below_bound():
    torch.manual_seed(0)
    g = _strengthen(dense_convnet((2, 4, 4), depth=2, growth=8, sn_rtol=1e-8).double())
    assert len(lipschitz_layers(g)) == 3
    xs = torch.randn(64, 2, 4, 4, dtype=F64) * 2
    lip = max_jacobian_norm(g, xs)
    assert 0.05 < lip <= g.lipschitz_bound * (1 + 1e-6), lip
    first = g[0]
    lip_layer = max_jacobian_norm(first, xs)
    assert 0.9 < lip_layer <= 0.98 * (1 + 1e-6), lip_layer


@pytest.mark.parametrize("act", ["cpila", "clipswish", "lipswish", "maxmin"])
def test_mlp_linearize_matches_func_jvp(act):
    torch.manual_seed(1)
    g = _strengthen(dense_mlp(3, depth=2, growth=6, act=act, zero_last=False).double(), 2.0)
    x = (torch.randn(5, 3, dtype=F64) * 1.5).requires_grad_(True)
    v = torch.randn(5, 3, dtype=F64)
    y, jvp = g.linearize(x)
    out = jvp(v)
    ref_y, ref = torch.func.jvp(g, (x.detach(),), (v,))
    assert torch.allclose(y, ref_y, atol=1e-13) and torch.allclose(out, ref, atol=1e-12)
    # the jvp is differentiable: d/dx and d/dparams of <u, J(x) v> equal double-backward autograd
    u = torch.randn_like(out)
    params = [p for p in g.parameters() if p.requires_grad]
    got = torch.autograd.grad((u * out).sum(), [x] + params, allow_unused=True)
    _, ref_diff = torch.autograd.functional.jvp(g, x, v, create_graph=True)
    want = torch.autograd.grad((u * ref_diff).sum(), [x] + params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-11)


def test_conv_linearize_matches_func_jvp():
    torch.manual_seed(2)
    g = _strengthen(dense_convnet((3, 5, 5), depth=2, growth=4).double(), 2.0)
    x = (torch.randn(2, 3, 5, 5, dtype=F64)).requires_grad_(True)
    v = torch.randn(2, 3, 5, 5, dtype=F64)
    y, jvp = g.linearize(x)
    out = jvp(v)
    ref_y, ref = torch.func.jvp(g, (x.detach(),), (v,))
    assert torch.allclose(y, ref_y, atol=1e-13) and torch.allclose(out, ref, atol=1e-12)
    u = torch.randn_like(out)
    (gx,) = torch.autograd.grad((u * out).sum(), x)
    _, ref_diff = torch.autograd.functional.jvp(g, x, v, create_graph=True)
    (gx_ref,) = torch.autograd.grad((u * ref_diff).sum(), x)
    assert torch.allclose(gx, gx_ref, atol=1e-11)


def test_concat_weights_norm_and_init():
    torch.manual_seed(0)
    g = dense_mlp(4, depth=3, lip_coeff=0.9).double()
    layers = [m for m in g.modules() if isinstance(m, DenseLayer)]
    assert len(layers) == 3
    for layer in layers:
        eta = layer.concat_weights()
        assert float(eta[0]) == pytest.approx(float(eta[1]), abs=1e-15)  # equal at init
        assert float(torch.linalg.vector_norm(eta)) == pytest.approx(0.9, abs=1e-14)
        with torch.no_grad():
            layer.concat_k.copy_(torch.randn(2) * 3)
        eta = layer.concat_weights()
        assert float(torch.linalg.vector_norm(eta)) == pytest.approx(0.9, abs=1e-14)
        assert float(eta.min()) > 0
    # the forward really uses them: the first d outputs of a dense layer are eta_1 x
    x = torch.randn(7, 4, dtype=F64)
    out = layers[0](x)
    assert out.shape == (7, 4 + 16)
    assert torch.allclose(out[:, :4], layers[0].concat_weights()[0] * x, atol=1e-15)


def test_concat_weights_learnable_only_when_switched_on():
    torch.manual_seed(0)
    g = dense_mlp(4, depth=2, growth=8, zero_last=False)
    ks = [m.concat_k for m in g.modules() if isinstance(m, DenseLayer)]
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    before = [k.detach().clone() for k in ks]
    x = torch.randn(16, 4)

    def step():
        opt.zero_grad(set_to_none=True)
        g(x).pow(2).sum().backward()
        grads = [k.grad for k in ks]
        opt.step()
        return grads

    # frozen: an exact zero gradient (in the graph, for DDP), and Adam leaves K where it is
    assert all(gr is not None and float(gr.abs().max()) == 0 for gr in step())
    assert all(torch.equal(k, b) for k, b in zip(ks, before))
    assert set_concat_weights_learnable(g, True) == 2
    grads = step()
    assert all(gr is not None and float(gr.abs().max()) > 0 for gr in grads)
    assert not any(torch.equal(k, b) for k, b in zip(ks, before))
    set_concat_weights_learnable(g, False)
    assert all(float(gr.abs().max()) == 0 for gr in step())
    with pytest.raises(ConfigError, match="True or False"):
        set_concat_weights_learnable(g, "yes")


def test_shapes_and_widths():
    g = dense_mlp(5, depth=3, growth=16)
    assert isinstance(g, DenseNet)
    widths = [m.layer.in_features for m in g if isinstance(m, DenseLayer)]
    assert widths == [5, 21, 37] and g[-1].in_features == 53 and g[-1].out_features == 5
    assert all(m.layer.out_features == 8 for m in g if isinstance(m, DenseLayer))  # cpila doubles to 16
    x = torch.randn(3, 5)
    assert g(x).shape == (3, 5)
    assert g(x).abs().max() < 1e-2  # zero_last: the block starts near the identity
    assert dense_mlp(5, depth=2, growth=7, act="lipswish")[0].layer.out_features == 7
    c = dense_convnet((3, 6, 6), depth=2, growth=10)
    convs = [m for m in c.modules() if isinstance(m, SpectralNormConv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in convs] == [(3, 5, 3), (13, 5, 3), (23, 3, 1)]
    assert c(torch.randn(2, 3, 6, 6)).shape == (2, 3, 6, 6)
    assert all(isinstance(m, SpectralNormLinear) for m in lipschitz_layers(g))


def test_residual_block_with_dense_g_inverts_and_logdet_is_exact():
    torch.manual_seed(3)
    g = _strengthen(dense_mlp(3, depth=2, growth=8, zero_last=False).double(), 2.0)
    block = ResidualBlock(g, LogDetEstimator("exact"), inverse_atol=1e-12, inverse_rtol=1e-12).double()
    x = torch.randn(6, 3, dtype=F64)
    y, log_det = block(x)
    jac = per_sample_jacobians(g, x)
    ref = torch.linalg.slogdet(torch.eye(3, dtype=F64) + jac)[1]
    assert torch.allclose(log_det, ref, atol=1e-10)
    assert torch.allclose(block.inverse(y), x, atol=1e-9)


@pytest.mark.parametrize(
    "build, kwargs, match",
    [
        (dense_mlp, dict(features=4, growth=7), "growth must be a multiple of 2"),
        (dense_mlp, dict(features=4, growth=7, act="clipswish"), "growth must be a multiple of 2"),
        (dense_mlp, dict(features=4, growth=7, act="maxmin"), "growth must be even"),
        (dense_mlp, dict(features=4, depth=0), "depth must be a positive integer"),
        (dense_mlp, dict(features=4, depth=2.0), "depth must be a positive integer"),
        (dense_mlp, dict(features=4, growth=0), "growth must be a positive integer"),
        (dense_mlp, dict(features=4, lip_coeff=1.0), "lip_coeff must be in"),
        (dense_mlp, dict(features=4, lip_coeff=0.0), "lip_coeff must be in"),
        (dense_mlp, dict(features=4, lip_coeff=-0.5), "lip_coeff must be in"),
        (dense_mlp, dict(features=4, coeff=1.2), "coeff must be in"),
        (dense_mlp, dict(features=4, act="relu"), "unknown Lipschitz activation"),
        (dense_convnet, dict(shape=(3, 8)), "shape must be"),
        (dense_convnet, dict(shape=(3, 8, 8), growth=5), "growth must be a multiple of 2"),
        (dense_convnet, dict(shape=(3, 8, 8), lip_coeff=1.5), "lip_coeff must be in"),
    ],
)
def test_bad_arguments(build, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build(**kwargs)
