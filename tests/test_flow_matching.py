"""Conditional flow matching for CNFs: the loss formula by hand, training on a 2-D toy improves the CNF's
likelihood and its samples, and models with more than one velocity field are refused."""

import pytest
import torch
from torch import nn

from flowforge.errors import ConfigError
from flowforge.flows.cnf import CNF
from flowforge.flows.ffjord import FFJORD
from flowforge.objectives.flow_matching import (
    cnf_inputs,
    flow_matching_flow_loss,
    flow_matching_loss,
    single_cnf,
)

F64 = torch.float64


class Affine(nn.Module):
    """``v(x, t) = W x + t c``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=F64))
        self.c = nn.Parameter(torch.tensor([1.0, -3.0], dtype=F64))

    def forward(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        return x @ self.w.T + t * self.c


def test_loss_matches_the_formula_by_hand():
    cnf = CNF(Affine(), dim=2, t1=2.0)  # T = 2: a time-convention slip (t vs t/T) changes every number below
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=F64)
    eps = torch.tensor([[0.0, -1.0], [3.0, 1.0]], dtype=F64)
    t = torch.tensor([0.5, 1.5], dtype=F64)
    loss = flow_matching_loss(cnf, x, t=t, noise=eps)
    # sample 0: s = t/T = 0.25, x_t = 0.75 x + 0.25 eps = (0.75, 1.25), u = (eps - x)/T = (-0.5, -1.5),
    #           v = W x_t + t c = (0.375 - 1.25 + 0.5, 1.5 + 0.3125 - 1.5) = (-0.375, 0.3125)
    # sample 1: s = 0.75, x_t = (2.0, 0.875), u = (2.0, 0.25),
    #           v = (1.0 - 0.875 + 1.5, 4.0 + 0.21875 - 4.5) = (1.625, -0.28125)
    expected = torch.tensor(
        [(-0.375 + 0.5) ** 2 + (0.3125 + 1.5) ** 2, (1.625 - 2.0) ** 2 + (-0.28125 - 0.25) ** 2], dtype=F64
    )
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    assert loss.shape == (2,)


def test_loss_is_zero_for_the_exact_conditional_velocity():
    """One data point and one noise draw: the straight path's velocity (eps - x)/T gives zero loss at any t."""
    x = torch.tensor([[1.0, -2.0]], dtype=F64)
    eps = torch.tensor([[0.5, 0.5]], dtype=F64)

    class Constant(nn.Module):
        def forward(self, t, xt):
            return ((eps - x) / 3.0).expand_as(xt)

    cnf = CNF(Constant(), dim=2, t1=3.0)
    for t in (0.0, 1.2, 2.9):
        assert float(flow_matching_loss(cnf, x, t=torch.tensor([t], dtype=F64), noise=eps)) < 1e-24
    assert (
        float(flow_matching_loss(CNF(Constant(), dim=2, t1=1.5), x, t=torch.tensor([0.3], dtype=F64), noise=eps)) > 0.1
    )


def two_blobs(n, generator=None):
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    idx = torch.randint(0, 2, (n,), generator=generator)
    return centers[idx] + 0.3 * torch.randn(n, 2, generator=generator)


def test_training_on_a_toy_reduces_the_loss_and_improves_the_likelihood():
    torch.manual_seed(0)
    flow = FFJORD(
        (2,),
        estimator={"name": "exact"},
        num_blocks=1,
        hidden=(32, 32),
        act="swish",
        method="rk4",
        step_size=0.1,
        adjoint=False,
        train_t1=False,
    )
    cnf = single_cnf(flow)
    test_x = two_blobs(512, torch.Generator().manual_seed(1))
    flow.eval()
    with torch.no_grad():
        before = flow.log_prob(test_x)
    flow.train()
    opt = torch.optim.Adam(cnf.velocity.parameters(), lr=5e-3)
    losses = []
    for _ in range(300):
        loss = flow_matching_loss(cnf, two_blobs(256)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.8 * first
    flow.eval()
    with torch.no_grad():
        after = flow.log_prob(test_x)
        samples = flow.sample(512)
    assert torch.isfinite(after).all()
    assert float(after.mean()) > float(before.mean()) + 0.5
    # the forward ODE carries data to noise, so the inverse turns noise into the two blobs at x1 = +-2
    assert float(samples[:, 0].abs().mean()) > 1.3 and float(samples[:, 1].abs().mean()) < 0.8


def test_single_cnf_accepts_one_block_and_refuses_the_rest():
    vec = FFJORD((2,), estimator={"name": "exact"}, hidden=(8,))
    assert single_cnf(vec) is vec.transform.transforms[0]
    image = FFJORD(
        (1, 4, 4),
        estimator={"name": "hutchinson"},
        channels=4,
        kernels=(3, 3),
        num_scales=1,
        blocks_per_scale=1,
        num_levels=17,
        logit_alpha=0.05,
    )
    cnf = single_cnf(image)
    assert cnf.shape == (1, 4, 4)
    x = torch.rand(3, 1, 4, 4) * 0.9 + 0.05
    y = cnf_inputs(image, x)
    torch.testing.assert_close(y, image.preprocess(x)[0])  # the logit space the CNF models
    loss = flow_matching_flow_loss(image, x)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    refused = [
        FFJORD((2,), estimator={"name": "exact"}, hidden=(8,), num_blocks=2),
        FFJORD((2,), estimator={"name": "exact"}, hidden=(8,), augment_dim=2),
        FFJORD(
            (1, 4, 4),
            estimator={"name": "hutchinson"},
            channels=4,
            kernels=(3, 3),
            num_scales=2,
            blocks_per_scale=1,
            num_levels=17,
            logit_alpha=0.05,
        ),
        FFJORD(
            (1, 4, 4),
            estimator={"name": "hutchinson"},
            channels=4,
            kernels=(3, 3),
            num_scales=1,
            blocks_per_scale=2,
            num_levels=17,
            logit_alpha=0.05,
        ),
    ]
    for flow in refused:
        with pytest.raises(ConfigError, match="model.num_blocks=1"):
            single_cnf(flow)
    with pytest.raises(ConfigError, match="augment_dim=0"):
        flow_matching_loss(refused[1].transform.transforms[0], torch.randn(2, 2))
