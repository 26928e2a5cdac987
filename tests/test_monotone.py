"""Monotone Flows: the block's forward/inverse, strong monotonicity, exact and estimated log-dets
(the odd series), implicit gradients, solver failures, and the image model."""

import logging
import math

import pytest
import torch
from conftest import assert_directional_derivative, settle_contraction
from torch import nn

from flowforge.errors import ConvergenceError
from flowforge.estimators import LogDetEstimator
from flowforge.flows.monotone import MonotoneBlock, MonotoneFlow
from flowforge.nn.densenet import dense_convnet, dense_mlp
from flowforge.nn.lipschitz import update_lipschitz
from flowforge.nn.lipschitz_net import lipschitz_mlp
from flowforge.testing import batch_jacobian_logdet, jacobian_matrix, mean_over_copies

EXACT = LogDetEstimator("exact")
TIGHT = dict(atol=1e-13, rtol=1e-13, max_iters=3000)
TIGHT_BACKWARD = dict(atol=1e-13, rtol=1e-13, max_iters=1000)


def g_net(kind, d=3):
    torch.manual_seed(0)
    if kind == "dense":
        return settle_contraction(dense_mlp(d, depth=2, growth=8, act="cpila", coeff=0.98, lip_coeff=0.98).double())
    return settle_contraction(lipschitz_mlp(d, [16, 16], act="lipswish", coeff=0.97, zero_last=False).double())


def block(g, estimator=EXACT, **kw):
    kw = {"forward_solver": TIGHT, "inverse_solver": TIGHT, "backward_solver": TIGHT_BACKWARD, **kw}
    return MonotoneBlock(g, estimator, **kw)


@pytest.mark.parametrize("kind", ["mlp", "dense"])
def test_forward_matches_the_definition_and_inverts(kind):
    blk = block(g_net(kind))
    x = torch.randn(8, 3, dtype=torch.float64) * 2
    y, _ = blk(x)
    # the definition: w + g(w) = sqrt(2) x, y = sqrt(2) w - x
    w = (y + x) / math.sqrt(2)
    torch.testing.assert_close(w + blk.g(w), math.sqrt(2) * x, atol=1e-11, rtol=0)
    x_rec = blk.inverse(y)
    assert (x_rec - x).abs().amax(1).max() < 1e-10
    assert blk.solves.get("forward").converged.all() and blk.solves.get("inverse").converged.all()


@pytest.mark.parametrize("kind", ["mlp", "dense"])
def test_exact_logdet_matches_brute_force_and_odd_series(kind):
    blk = block(g_net(kind))
    x = torch.randn(6, 3, dtype=torch.float64)
    y, ld = blk(x)
    torch.testing.assert_close(ld, batch_jacobian_logdet(blk, x), atol=1e-9, rtol=0)
    # the same number from the formula log det(I - J_g(w)) - log det(I + J_g(w)) at w
    w = (y + x) / math.sqrt(2)
    j = jacobian_matrix(blk.g, w)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(
        ld, torch.linalg.slogdet(eye - j)[1] - torch.linalg.slogdet(eye + j)[1], atol=1e-10, rtol=0
    )
    x2, ld_inv = blk.inverse_and_log_det(y)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["mlp", "dense"])
def test_strongly_monotone_on_random_pairs(kind):
    """<F(x) - F(x'), x - x'> >= m |x - x'|^2 with m = (1 - L) / (1 + L), L = Lip(g): the Cayley transform
    of an L-contraction.  (With L >= 1 the bound is not guaranteed; the test would then fail.)"""
    g = g_net(kind)
    lip = max(
        float(torch.linalg.matrix_norm(j, 2)) for j in jacobian_matrix(g, torch.randn(200, 3, dtype=torch.float64) * 3)
    )
    assert lip < 1
    blk = block(g)
    torch.manual_seed(1)
    a, b = torch.randn(2000, 3, dtype=torch.float64) * 3, torch.randn(2000, 3, dtype=torch.float64) * 3
    inner = ((blk(a)[0] - blk(b)[0]) * (a - b)).sum(1)
    bound = (1 - 0.98) / (1 + 0.98) * (a - b).pow(2).sum(1)  # 0.98 >= every Lip(g) here
    assert (inner > 0).all() and (inner >= bound - 1e-12).all()


class LinearG(nn.Module):
    """g(x) = A x, A symmetric with eigenvalues (0.8, -0.6, 0.3): the monotone log-det is
    sum log((1 - l) / (1 + l))."""

    def __init__(self):
        super().__init__()
        q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
        self.eig = torch.tensor([0.8, -0.6, 0.3], dtype=torch.float64)
        self.a = nn.Parameter(q @ torch.diag(self.eig) @ q.T)

    def forward(self, x):
        return x @ self.a.T


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="roulette", dist="geometric", p=0.5, n_exact_terms=2, probe="gaussian"),
        dict(name="roulette", dist="poisson", lam=2.0, n_exact_terms=1, probe="rademacher"),
    ],
)
def test_roulette_odd_series_is_unbiased(kwargs):
    torch.manual_seed(0)
    g = LinearG()
    exact = float(torch.log((1 - g.eig) / (1 + g.eig)).sum())
    x = torch.randn(2, 3, dtype=torch.float64)
    est = LogDetEstimator(**kwargs)
    torch.manual_seed(11)
    draw = lambda: mean_over_copies(lambda v: est(g, v, True, kind="monotone")[1], x, 5)  # noqa: E731
    with torch.no_grad():  # 600 draws, each one call on 5 copies of x
        draws = torch.stack([draw() for _ in range(600)])
    z = (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(600))
    assert (z.abs() < 3).all(), f"monotone roulette mean {draws.mean(0)} vs exact {exact}: z = {z}"
    # negative control: the truncated odd series with 1 term is biased
    torch.manual_seed(11)
    with torch.no_grad():
        trunc = torch.stack(
            [
                LogDetEstimator("power_series", n_terms=1, probe="rademacher")(g, x, True, kind="monotone")[1]
                for _ in range(3000)
            ]
        )
    assert ((trunc.mean(0) - exact) / (trunc.std(0) / math.sqrt(3000))).abs().min() > 6


def test_neumann_gradient_of_the_odd_series_is_unbiased():
    """E[grad of the Neumann surrogate] equals the gradient of log det(I - A) - log det(I + A) in A."""
    torch.manual_seed(0)
    g = LinearG()
    eye = torch.eye(3, dtype=torch.float64)
    exact = torch.autograd.grad(torch.linalg.slogdet(eye - g.a)[1] - torch.linalg.slogdet(eye + g.a)[1], g.a)[0]
    x = torch.randn(1, 3, dtype=torch.float64)
    est = LogDetEstimator("roulette", n_exact_terms=2, neumann_grad=True, probe="gaussian")
    torch.manual_seed(3)
    draw = lambda: mean_over_copies(lambda v: est(g, v, True, kind="monotone")[1], x, 5)  # noqa: E731
    grads = torch.stack([torch.autograd.grad(draw().sum(), g.a)[0] for _ in range(600)])  # 5 copies per call
    dirs = torch.cat([exact.reshape(1, -1) / exact.norm(), torch.randn(3, 9, dtype=torch.float64)])
    proj = grads.reshape(600, -1) @ dirs.T
    z = (proj.mean(0) - dirs @ exact.reshape(-1)) / (proj.std(0) / math.sqrt(600))
    assert (z.abs() < 3.5).all(), z


@pytest.mark.parametrize("kind", ["mlp", "dense"])
def test_implicit_gradients_match_unrolled_autograd_and_finite_differences(kind):
    g = g_net(kind)
    blk = block(g)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in g.parameters() if p.requires_grad]

    def loss_implicit():
        y, ld = blk(x)
        return (y.pow(2).sum(1) + ld).sum()

    def loss_unrolled():
        w = math.sqrt(2) * x
        for _ in range(600):  # autograd through every Picard step of w = sqrt(2) x - g(w)
            w = math.sqrt(2) * x - g(w)
        y = math.sqrt(2) * w - x
        j = torch.stack(
            [torch.autograd.functional.jacobian(lambda v: g(v[None])[0], wi, create_graph=True) for wi in w]
        )
        eye = torch.eye(3, dtype=torch.float64)
        ld = torch.linalg.slogdet(eye - j)[1] - torch.linalg.slogdet(eye + j)[1]
        return (y.pow(2).sum(1) + ld).sum()

    gi = torch.autograd.grad(loss_implicit(), params + [x], allow_unused=True)
    gu = torch.autograd.grad(loss_unrolled(), params + [x], allow_unused=True)
    for a, b in zip(gi, gu):
        if a is None or b is None:
            assert a is None or b is None or float(a.abs().max()) == 0 or float(b.abs().max()) == 0
            continue
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)
    p, g_p = next((p, a) for p, a in zip(params, gi) if a is not None and p.dim() > 1)
    assert_directional_derivative(loss_implicit, p, g_p)
    assert blk.solves.get("forward backward").converged.all()


def test_forward_solve_failure_is_counted_and_raised(caplog):
    g = g_net("mlp")
    one_step = dict(method="picard", atol=1e-14, rtol=0, max_iters=1, fallback_iters=0)
    blk = block(g, forward_solver=one_step)
    x = torch.randn(5, 3, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="flowforge"):
        blk(x)
    assert blk.solves.failures["forward"] == 5 and "5 of 5 samples did not converge" in caplog.text
    strict = block(g, forward_solver=one_step, on_fail="raise")
    with pytest.raises(ConvergenceError, match="MonotoneBlock forward"):
        strict(x)


def test_image_block_exact_logdet_and_inverse():
    torch.manual_seed(0)
    g = settle_contraction(dense_convnet((2, 4, 4), depth=2, growth=4, act="cpila").double(), scale=0.3)
    blk = block(g)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    y, ld = blk(x)
    torch.testing.assert_close(ld, batch_jacobian_logdet(blk, x), atol=1e-9, rtol=0)
    assert (blk.inverse(y) - x).abs().amax((1, 2, 3)).max() < 1e-10


@pytest.mark.slow
def test_image_model_builds_with_the_paper_layout_and_round_trips():
    torch.manual_seed(0)
    flow = MonotoneFlow(
        (1, 8, 8),
        estimator=EXACT,
        blocks_per_scale=[1, 1],
        fc_blocks=1,
        depth=2,
        growth=4,
        fc_growth=4,
        num_levels=256,
        logit_alpha=0.05,
        forward_solver=TIGHT,
        inverse_solver=TIGHT,
        backward_solver=TIGHT_BACKWARD,
    ).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    flow(x)
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    update_lipschitz(flow, rtol=1e-12, max_iters=5000)
    z, ld = flow(x)
    torch.testing.assert_close(ld, batch_jacobian_logdet(flow, x), atol=1e-7, rtol=0)
    assert (flow.inverse(z) - x).abs().amax((1, 2, 3)).max() < 1e-5
    n_blocks = sum(isinstance(m, MonotoneBlock) for m in flow.modules())
    assert n_blocks == 3


def test_solver_summary_reports_the_steps_solves():
    from flowforge.flows.contractive_block import clear_solve_records, solver_summary

    flow = MonotoneFlow((2,), estimator=EXACT, num_blocks=2, growth=8)
    assert solver_summary(torch.nn.Linear(2, 2)) == {}
    (-flow.log_prob(torch.randn(16, 2))).mean().backward()
    s = solver_summary(flow)
    assert set(s) == {"iters/forward", "iters/forward_backward", "failures"}
    assert s["iters/forward"] >= 1 and s["failures"] == 0
    clear_solve_records(flow)
    assert solver_summary(flow) == {}  # nothing solved since the records were cleared
