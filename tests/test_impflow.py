"""Implicit Flows: z + g_z(z) = x + g_x(x) solved both ways, exact log-dets, implicit gradients,
the larger 1-D function class, and the image model."""

import math

import pytest
import torch
from conftest import assert_directional_derivative, settle_contraction
from torch import nn

from flowforge.estimators import LogDetEstimator
from flowforge.flows.impflow import ImplicitBlock, ImplicitFlow
from flowforge.nn.lipschitz_net import lipschitz_convnet, lipschitz_mlp
from flowforge.testing import batch_jacobian_logdet, mean_over_copies

EXACT = LogDetEstimator("exact")
TIGHT = dict(atol=1e-13, rtol=1e-13, max_iters=500, fallback_iters=3000)
TIGHT_BACKWARD = dict(atol=1e-13, rtol=1e-13, max_iters=1000)


def mlp(d=3, act="sin"):
    return settle_contraction(lipschitz_mlp(d, [16, 16], act=act, coeff=0.97, zero_last=False).double())


def block(gx, gz, method="broyden", **kw):
    solver = {**TIGHT, "method": method}
    return ImplicitBlock(
        gx,
        gz,
        kw.pop("estimator", EXACT),
        forward_solver=solver,
        inverse_solver=solver,
        backward_solver=TIGHT_BACKWARD,
        **kw,
    )


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_block_solves_the_implicit_equation_both_ways(method):
    torch.manual_seed(0)
    blk = block(mlp(), mlp(), method)
    x = torch.randn(8, 3, dtype=torch.float64) * 2
    z, _ = blk(x)
    torch.testing.assert_close(z + blk.residual_z.g(z), x + blk.residual_x.g(x), atol=1e-11, rtol=0)
    assert (blk.inverse(z) - x).abs().amax(1).max() < 1e-10


@pytest.mark.parametrize("act", ["sin", "lipswish"])
def test_exact_logdet_matches_brute_force(act):
    torch.manual_seed(1)
    blk = block(mlp(act=act), mlp(act=act))
    x = torch.randn(6, 3, dtype=torch.float64)
    z, ld = blk(x)
    torch.testing.assert_close(ld, batch_jacobian_logdet(blk, x), atol=1e-9, rtol=0)
    x2, ld_inv = blk.inverse_and_log_det(z)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-10, rtol=0)
    torch.testing.assert_close(x2, x, atol=1e-10, rtol=0)


def test_implicit_gradients_match_unrolled_autograd_and_finite_differences():
    torch.manual_seed(2)
    gx, gz = mlp(), mlp()
    blk = block(gx, gz)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in list(gx.parameters()) + list(gz.parameters()) if p.requires_grad]
    eye = torch.eye(3, dtype=torch.float64)

    def loss_implicit():
        z, ld = blk(x)
        return (z.pow(2).sum(1) * torch.arange(1, 5) + ld).sum()

    def loss_unrolled():
        a = x + gx(x)
        z = a
        for _ in range(800):  # autograd through every Picard step of z = a - g_z(z)
            z = a - gz(z)

        def jac(g, v):
            return torch.stack(
                [torch.autograd.functional.jacobian(lambda u: g(u[None])[0], vi, create_graph=True) for vi in v]
            )

        ld = torch.linalg.slogdet(eye + jac(gx, x))[1] - torch.linalg.slogdet(eye + jac(gz, z))[1]
        return (z.pow(2).sum(1) * torch.arange(1, 5) + ld).sum()

    gi = torch.autograd.grad(loss_implicit(), params + [x], allow_unused=True)
    gu = torch.autograd.grad(loss_unrolled(), params + [x], allow_unused=True)
    for a, b in zip(gi, gu):
        if a is None or b is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)
    assert blk.residual_z.solves.get("inverse backward").converged.all()
    p, g_p = next((p, a) for p, a in zip(params, gi) if a is not None and p.dim() > 1)
    assert_directional_derivative(loss_implicit, p, g_p)


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


def test_one_block_reaches_slopes_no_residual_block_can():
    """A residual block's slope lies in [1 - L, 1 + L]; with g_x = 0.99 x and g_z = -0.99 z one implicit
    block is z = (1.99 / 0.01) x, slope 199 (and log-det log 199)."""
    blk = ImplicitBlock(Scale(0.99), Scale(-0.99), EXACT, forward_solver=dict(method="anderson", atol=1e-12, rtol=0))
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    z, ld = blk(x)
    torch.testing.assert_close(z, 199 * x, atol=1e-8, rtol=1e-10)
    torch.testing.assert_close(ld, torch.full((5,), math.log(199), dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.slow
def test_roulette_logdet_is_unbiased_for_the_block():
    """The block's estimate is the difference of two unbiased series: its mean matches the exact log-det."""
    torch.manual_seed(3)
    gx, gz = mlp(), mlp()
    est = LogDetEstimator("roulette", n_exact_terms=2, probe="rademacher")
    blk = block(gx, gz, estimator=est)
    x = torch.randn(2, 3, dtype=torch.float64)
    exact = block(gx, gz)(x)[1].detach()
    blk.train()
    torch.manual_seed(4)
    with torch.no_grad():  # 300 calls on 5 copies of x each (mean_over_copies)
        draws = torch.stack([mean_over_copies(lambda v: blk(v)[1], x, 5) for _ in range(300)])
    z = (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(300))
    assert (z.abs() < 3).all(), z


def test_image_block_and_model():
    torch.manual_seed(0)
    gx = settle_contraction(lipschitz_convnet((2, 4, 4), 8, act="sin", coeff=0.9, preact=False).double(), 0.3)
    gz = settle_contraction(lipschitz_convnet((2, 4, 4), 8, act="sin", coeff=0.9, preact=True).double(), 0.3)
    blk = block(gx, gz)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    z, ld = blk(x)
    torch.testing.assert_close(ld, batch_jacobian_logdet(blk, x), atol=1e-9, rtol=0)
    assert (blk.inverse(z) - x).abs().amax((1, 2, 3)).max() < 1e-10
    flow = ImplicitFlow(
        (1, 8, 8),
        estimator=EXACT,
        blocks_per_scale=[1, 1],
        channels=4,
        fc_blocks=1,
        fc_hidden=[8],
        num_levels=256,
        logit_alpha=0.05,
        forward_solver=TIGHT,
        inverse_solver=TIGHT,
        backward_solver=TIGHT_BACKWARD,
    ).double()
    assert sum(isinstance(m, ImplicitBlock) for m in flow.modules()) == 3
    xi = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    flow(xi)
    zi, _ = flow(xi)
    assert (flow.inverse(zi) - xi).abs().max() < 1e-5
