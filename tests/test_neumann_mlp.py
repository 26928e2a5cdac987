"""The hand-written Neumann-gradient log-det of Lipschitz MLPs (flowforge.estimators.neumann_mlp) against the
autograd route through flowforge.estimators.series.neumann_logdet, in float64: same value, same gradients in
x and every parameter, for any per-sample weighting of the log-dets."""

from __future__ import annotations

import pytest
import torch

from flowforge.estimators import LogDetEstimator
from flowforge.estimators.logdet import linearize
from flowforge.estimators.neumann_mlp import mlp_plan, neumann_mlp_logdet
from flowforge.estimators.series import neumann_logdet
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.activations import lipschitz_activation
from flowforge.nn.lipschitz_net import lipschitz_convnet, lipschitz_mlp

ACTS = ["lipswish", "elu", "softplus", "sin", "pila"]


def _mlp(act: str, preact: bool = False, dim: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    g = lipschitz_mlp(dim, [16, 12], act=act, coeff=0.9, preact=preact, zero_last=False).double()
    with torch.no_grad():
        for p in g.parameters():
            if p.dim() == 0:  # LipSwish's beta away from its initial value
                p.add_(0.3)
    g(torch.randn(4, dim, dtype=torch.float64))  # the first spectral-norm estimate
    return g


def _loss_terms(g, x, probes, weights, fused: bool):
    if fused:
        plan = mlp_plan(g, x)
        assert plan is not None
        return neumann_mlp_logdet(plan, x, probes, weights)
    y, jvp = linearize(g, x)
    est = sum(neumann_logdet(jvp, v, weights) for v in probes) / len(probes)
    return y, est


def _grads(g, fused: bool, weights, n_probes: int = 1, per_sample: bool = True, dim: int = 3):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(9, dim, generator=gen, dtype=torch.float64)
    probes = [torch.randn(9, dim, generator=gen, dtype=torch.float64) for _ in range(n_probes)]
    a = torch.rand(9, generator=gen, dtype=torch.float64) if per_sample else torch.full((9,), 0.25, dtype=torch.float64)
    c = torch.randn(9, dim, generator=gen, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    y, est = _loss_terms(g, x, probes, weights, fused)
    loss = (a * est).sum() + (c * y).sum()
    params = [p for p in g.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return y.detach(), est.detach(), grads


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("preact", [False, True])
def test_value_and_gradients_match_the_autograd_neumann_route(act, preact):
    g = _mlp(act, preact)
    weights = [1.0, -1.0, 0.0, -0.7, 0.35]  # a roulette-like draw, with a zero term
    y0, e0, g0 = _grads(g, False, weights)
    y1, e1, g1 = _grads(g, True, weights)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-12)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    # the check is not vacuous: the log-det's gradient is not zero and differs from g(x)'s alone
    assert float(g1[0].abs().max()) > 1e-3


@pytest.mark.parametrize(
    "weights, n_probes, per_sample",
    [([2.0, 0.0, 2.0 / 3.0], 1, True), ([1.0, -1.0, 1.0], 3, False), ([0.0, 0.0], 1, True)],
    ids=["monotone-odd-series", "three-probes-mean-loss", "no-terms"],
)
def test_other_weights_probes_and_losses(weights, n_probes, per_sample):
    g = _mlp("lipswish")
    y0, e0, g0 = _grads(g, False, weights, n_probes, per_sample)
    y1, e1, g1 = _grads(g, True, weights, n_probes, per_sample)
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-12)
    for a, b in zip(g0, g1):
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_slope", [True, False])
def test_activation_second_order_pullback_matches_autograd(act, with_slope):
    torch.manual_seed(0)
    phi = lipschitz_activation(act).double()
    with torch.no_grad():
        for p in phi.parameters():
            p.add_(0.4)
    x = torch.randn(50, 7, dtype=torch.float64) * 2
    x[0, 0] = 0.0
    c_value, c_slope = torch.randn_like(x), (torch.randn_like(x) if with_slope else None)
    y, d, pullback = phi.second_order(x)
    gx, gp = pullback(c_value.clone(), None if c_slope is None else c_slope.clone())  # it may overwrite them
    xl = x.clone().requires_grad_(True)
    params = [p for p in phi.parameters() if p.requires_grad]
    y_ref, d_ref = phi.value_and_derivative(xl)
    obj = (c_value * y_ref).sum() + ((c_slope * d_ref).sum() if with_slope else 0.0)
    ref = torch.autograd.grad(obj, [xl, *params])
    torch.testing.assert_close(y, y_ref.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(d, d_ref.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(gx, ref[0], rtol=1e-12, atol=1e-13)
    assert len(gp) == len(params)
    for a, b in zip(gp, ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_plan_only_for_vector_mlps_of_linear_layers_and_elementwise_activations():
    x = torch.randn(4, 3)
    assert mlp_plan(lipschitz_mlp(3, [8], act="lipswish"), x) is not None
    assert mlp_plan(lipschitz_mlp(3, [8], act="lipswish"), x.view(4, 3, 1)) is None
    assert mlp_plan(lipschitz_mlp(3, [8], act="clipswish"), x) is None  # concatenating activation
    assert mlp_plan(lipschitz_mlp(3, [8], act="lipswish", context_features=2), x) is None
    assert mlp_plan(lipschitz_convnet((3, 4, 4), width=8), torch.randn(2, 3, 4, 4)) is None


@pytest.mark.parametrize("mem_eff", [False, True])
def test_residual_block_trains_the_same_with_and_without_the_fused_route(mem_eff):
    torch.manual_seed(0)
    g = lipschitz_mlp(3, [16, 16], act="lipswish", coeff=0.9, zero_last=False).double()
    results = []
    for fused in (False, True):
        est = LogDetEstimator("roulette", n_exact_terms=2, neumann_grad=True, mem_eff=mem_eff, fused=fused)
        block = ResidualBlock(g, est).double().train()
        x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        torch.manual_seed(7)  # the roulette draw and the probe
        y, log_det = block(x)
        loss = (y**2).sum() - log_det.mean()
        grads = torch.autograd.grad(loss, [x, *g.parameters()])
        results.append((y.detach(), log_det.detach(), grads, block.last_terms))
    (y0, l0, g0, n0), (y1, l1, g1, n1) = results
    assert n0 == n1 >= 2
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-12)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_any_sequence_of_stages_two_linear_maps_in_a_row():
    from flowforge.nn.activations import LipSwish
    from flowforge.nn.lipschitz import SpectralNormLinear
    from flowforge.nn.lipschitz_net import LipschitzNet

    torch.manual_seed(0)
    lin = [SpectralNormLinear(a, b, coeff=0.9) for a, b in ((2, 8), (8, 8), (8, 2))]
    g = LipschitzNet(lin[0], lin[1], LipSwish(), lin[2]).double()
    g(torch.randn(4, 2, dtype=torch.float64))
    weights = [1.0, -1.0, 0.5, -0.25]  # more terms than dimensions: the per-sample Jacobian route
    y0, e0, g0 = _grads(g, False, weights, dim=2)
    y1, e1, g1 = _grads(g, True, weights, dim=2)
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-12)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_a_compiled_step_runs_the_fused_route_eagerly_and_matches_the_eager_step(monkeypatch):
    """Under ``torch.compile`` the block's hand-written route runs eagerly between the compiled pieces (it is
    called, once per forward), and the compiled loss and gradients equal the eager ones."""
    import flowforge.estimators.neumann_mlp as nm

    torch.manual_seed(0)
    g = lipschitz_mlp(3, [16, 16], act="lipswish", coeff=0.9, zero_last=False).double()
    est = LogDetEstimator("roulette", n_exact_terms=2, neumann_grad=True, mem_eff=True)
    block = ResidualBlock(g, est).double().train()
    monkeypatch.setattr(type(block.logdet_estimator.roulette), "sample", lambda self: 3)
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    probe = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr("flowforge.estimators.logdet.sample_probe", lambda like, kind: probe)
    calls = []
    real = nm.neumann_mlp_logdet
    monkeypatch.setattr(nm, "neumann_mlp_logdet", lambda *a: calls.append(1) or real(*a))

    def loss_fn(x):
        y, log_det = block(x)
        return (y**2).sum() - log_det.mean()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager")):
        torch._dynamo.reset()
        loss = fn(x)
        results.append((loss.detach(), torch.autograd.grad(loss, list(g.parameters()))))
    assert len(calls) == 2  # the eager step and the compiled one both took the hand-written route
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-12)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
