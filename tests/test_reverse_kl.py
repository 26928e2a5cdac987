"""Reverse-KL pieces: targets' exact log Z (quadrature, closed-form densities) and exact samples,
importance-sampled log Z with an exact and a mismatched q, the pathwise gradient of the reverse-KL loss,
a short reverse-KL fit of a RealNVP reaching the known log Z, the target data module, and clear errors.

Tolerances: quadrature log Z 1e-6 (trapezoid on Gaussian-type integrands is spectrally accurate; the
truncated tails are below 1e-12); closed-form log densities 1e-10 (float64); sample moments and Monte
Carlo estimates within 4 (moments) or 3 (log Z, gradients) standard errors at fixed seeds."""

import math

import pytest
import torch
from torch import nn

from flowforge.errors import ConfigError, DataError, FlowforgeError
from flowforge.flows.base import Transform
from flowforge.flows.distributions import StandardNormal
from flowforge.flows.model import Flow
from flowforge.objectives.reverse_kl import (
    NonFiniteWeightsError,
    importance_log_z,
    reverse_kl_loss,
    skip_data_init,
)
from flowforge.targets import Banana, Funnel, GaussianMixture2D, Target, make_target


# ----------------------------------------------------------------------------- helpers
class ShiftScale(Transform):
    """``z = (x - m) / exp(log_s)`` elementwise: with a standard normal base, q = N(m, diag(exp(2 log_s)))."""

    def __init__(self, m, log_s):
        super().__init__()
        self.m = nn.Parameter(torch.as_tensor(m, dtype=torch.float64).clone())
        self.log_s = nn.Parameter(torch.as_tensor(log_s, dtype=torch.float64).clone())

    def forward(self, x):
        return (x - self.m) * torch.exp(-self.log_s), (-self.log_s).sum().expand(x.shape[0])

    def inverse(self, z):
        return self.m + torch.exp(self.log_s) * z

    def inverse_and_log_det(self, z):
        return self.inverse(z), self.log_s.sum().expand(z.shape[0])


def gaussian_flow(m, s):
    """A float64 Flow whose q is exactly N(m, diag(s^2))."""
    m = torch.as_tensor(m, dtype=torch.float64)
    t = ShiftScale(m, torch.log(torch.as_tensor(s, dtype=torch.float64)))
    return Flow(t, StandardNormal((m.numel(),)).double(), (m.numel(),))


def trapezoid_2d(log_f, a, b):
    """log of the 2-D trapezoid integral of exp(log_f) over the grid a x b (1-D float64 grids)."""
    xa, xb = torch.meshgrid(a, b, indexing="ij")
    lf = log_f(xa, xb)
    wa = torch.full_like(a, 1.0)
    wa[0] = wa[-1] = 0.5
    wb = torch.full_like(b, 1.0)
    wb[0] = wb[-1] = 0.5
    return float(torch.logsumexp((lf + torch.log(wa)[:, None] + torch.log(wb)[None, :]).flatten(), 0))


def grid(lo, hi, h):
    n = int(round((hi - lo) / h)) + 1
    return torch.linspace(lo, hi, n, dtype=torch.float64), (hi - lo) / (n - 1)


def quadrature_log_z(target):
    """log integral of exp(target.log_prob) over R^2 by the trapezoid rule on a grid wide enough that the
    omitted tails are < 1e-12 of the mass (funnel: x = a sinh(t), so the grid follows e^{v/2} scales)."""

    def lp(a, b):
        return target.log_prob(torch.stack([a.flatten(), b.flatten()], 1)).view(a.shape)

    if isinstance(target, GaussianMixture2D):
        r = target.radius + 10 * target.std
        g, h = grid(-r, r, target.std / 10)
        return trapezoid_2d(lp, g, g) + 2 * math.log(h)
    if isinstance(target, Banana):
        s, b = target.scale, target.curvature
        g1, h1 = grid(-8 * s, 8 * s, s / 20)
        lo, hi = min(0.0, b * (64 * s**2 - s**2)) - b * s**2 - 10, max(0.0, b * 63 * s**2) + abs(b) * s**2 + 10
        g2, h2 = grid(lo, hi, 0.1)
        return trapezoid_2d(lp, g1, g2) + math.log(h1 * h2)
    if isinstance(target, Funnel):
        s, a = target.scale, 1e-8
        gv, hv = grid(-9 * s, 9 * s, s / 30)
        gt, ht = grid(-38.0, 38.0, 0.05)

        # x = a sinh(t), dx = a cosh(t) dt
        def log_f(v, t):
            return lp(v, a * torch.sinh(t)) + math.log(a) + torch.log(torch.cosh(t))

        return trapezoid_2d(log_f, gv, gt) + math.log(hv * ht)
    raise TypeError(target)


def assert_mean(values, expected, z=4.0):
    """The sample mean of ``values`` is within ``z`` standard errors of ``expected``."""
    values = values.double()
    se = float(values.std()) / math.sqrt(values.numel())
    assert abs(float(values.mean()) - expected) < z * se, (float(values.mean()), expected, se)


# ----------------------------------------------------------------------------- targets
TARGET_CASES = {
    "mixture8": lambda: make_target("mixture2d"),
    "mixture4_shifted": lambda: make_target("mixture2d", num_components=4, radius=2.0, std=0.8, log_constant=-1.3),
    "banana": lambda: make_target("banana"),
    "banana_steep": lambda: make_target("banana", curvature=-1.5, scale=1.0, log_constant=2.0),
    "funnel": lambda: make_target("funnel"),
    "funnel_narrow": lambda: make_target("funnel", scale=1.5, log_constant=0.7),
}


@pytest.mark.parametrize("case", sorted(TARGET_CASES))
def test_log_z_matches_2d_quadrature(case):
    target = TARGET_CASES[case]()
    assert target.log_z != 0.0
    assert abs(quadrature_log_z(target) - target.log_z) < 1e-6


def test_log_z_values():
    assert make_target("mixture2d").log_z == pytest.approx(math.log(8) + math.log(2 * math.pi * 0.25), abs=1e-12)
    assert make_target("banana", dim=3).log_z == pytest.approx(1.5 * math.log(2 * math.pi) + math.log(2.0), abs=1e-12)
    assert make_target("funnel", dim=10).log_z == pytest.approx(5 * math.log(2 * math.pi) + math.log(3.0), abs=1e-12)


def _normalised_reference(target, x):
    """log p(x) from torch.distributions (independent of the target's own formula)."""
    D = torch.distributions

    def f64(v):
        return torch.tensor(v, dtype=torch.float64)  # (python-float parameters would make float32 Normals)

    if isinstance(target, GaussianMixture2D):
        comp = D.Independent(D.Normal(target.centers, torch.full_like(target.centers, target.std)), 1)
        mix = D.Categorical(torch.ones(target.num_components, dtype=torch.float64))
        return D.MixtureSameFamily(mix, comp).log_prob(x)
    if isinstance(target, Banana):
        x1, x2 = x[:, 0], x[:, 1]
        out = D.Normal(f64(0.0), f64(target.scale)).log_prob(x1)
        out = out + D.Normal(target.curvature * (x1**2 - target.scale**2), f64(1.0)).log_prob(x2)
        return out + D.Normal(f64(0.0), f64(1.0)).log_prob(x[:, 2:]).sum(1)
    v = x[:, 0]
    return D.Normal(f64(0.0), f64(target.scale)).log_prob(v) + D.Normal(f64(0.0), torch.exp(0.5 * v)[:, None]).log_prob(
        x[:, 1:]
    ).sum(1)


@pytest.mark.parametrize("name,dim", [("mixture2d", 2), ("banana", 2), ("banana", 5), ("funnel", 2), ("funnel", 6)])
def test_log_prob_minus_log_z_is_the_normalised_density(name, dim):
    target = make_target(name, dim, log_constant=0.4)
    x = 1.5 * torch.randn(64, dim, dtype=torch.float64)
    diff = target.log_prob(x) - target.log_z - _normalised_reference(target, x)
    assert diff.abs().max() < 1e-10


@pytest.mark.parametrize("name,dim", [("mixture2d", 2), ("banana", 4), ("funnel", 3)])
def test_log_prob_dtypes_and_gradients(name, dim):
    target = make_target(name, dim)
    x64 = target.sample(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_(True)
    x32 = x64.detach().float().requires_grad_(True)
    lp64, lp32 = target.log_prob(x64), target.log_prob(x32)
    assert lp64.dtype == torch.float64 and lp32.dtype == torch.float32 and lp64.shape == (32,)
    assert torch.allclose(lp32.double(), lp64, rtol=1e-5, atol=1e-3)
    (g,) = torch.autograd.grad(lp64.sum(), x64)
    assert torch.isfinite(g).all()
    # the autograd gradient is the derivative of log_prob (central differences along a random direction)
    d, eps = torch.randn_like(x64), 1e-6
    with torch.no_grad():
        fd = (target.log_prob(x64 + eps * d) - target.log_prob(x64 - eps * d)) / (2 * eps)
    assert torch.allclose(fd, (g * d).sum(1), rtol=1e-5, atol=1e-5)


def test_mixture_samples_match_density():
    t = make_target("mixture2d", num_components=8, radius=3.0, std=0.5)
    x = t.sample(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (200_000, 2) and x.dtype == torch.float64
    for i in range(2):
        assert_mean(x[:, i], 0.0)
        assert_mean(x[:, i] ** 2, t.radius**2 / 2 + t.std**2)
    # each sample sits in a component of the stated width, components equally likely (a sharper
    # mixture, so that the nearest centre is the sampled one up to a probability of ~1e-8)
    t = make_target("mixture2d", num_components=8, radius=3.0, std=0.2)
    x = t.sample(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d2 = (x[:, None, :] - t.centers).square().sum(-1)
    nearest = d2.argmin(1)
    assert_mean(d2.min(1).values, 2 * t.std**2)
    counts = torch.bincount(nearest, minlength=8).double() / x.shape[0]
    assert (counts - 1 / 8).abs().max() < 4 * math.sqrt(1 / 8 * 7 / 8 / x.shape[0])


def test_banana_samples_match_density():
    t = make_target("banana", dim=3, curvature=0.5, scale=2.0)
    x = t.sample(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b, s = t.curvature, t.scale
    assert_mean(x[:, 0], 0.0)
    assert_mean(x[:, 0] ** 2, s**2)
    assert_mean(x[:, 1], 0.0)
    assert_mean(x[:, 1] ** 2, 1 + 2 * b**2 * s**4)  # Var(x2) = 1 + b^2 Var(x1^2) = 1 + 2 b^2 s^4
    assert_mean((x[:, 1] - b * (x[:, 0] ** 2 - s**2)) ** 2, 1.0)
    assert_mean(x[:, 2] ** 2, 1.0)


def test_funnel_samples_match_density():
    t = make_target("funnel", dim=3, scale=3.0)
    x = t.sample(200_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = x[:, 0]
    assert_mean(v, 0.0)
    assert_mean(v**2, 9.0)
    for i in (1, 2):
        assert_mean(x[:, i], 0.0)
        assert_mean(x[:, i] ** 2 * torch.exp(-v), 1.0)
    # sample() and log_prob() agree beyond moments: the mass of {v > 0, |x_1| < 1} by samples and quadrature
    t2 = make_target("funnel", dim=2, scale=3.0)
    x2 = t2.sample(200_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    frac = ((x2[:, 0] > 0) & (x2[:, 1].abs() < 1)).double()
    gv, hv = grid(0.0, 27.0, 0.05)
    gx, hx = grid(-1.0, 1.0, 0.002)

    def lp(a, b):
        return t2.log_prob(torch.stack([a.flatten(), b.flatten()], 1)).view(a.shape)

    mass = math.exp(trapezoid_2d(lp, gv, gx) + math.log(hv * hx) - t2.log_z)
    assert_mean(frac, mass)


def test_sample_is_reproducible_with_a_generator():
    t = make_target("banana")
    a = t.sample(10, generator=torch.Generator().manual_seed(5))
    b = t.sample(10, generator=torch.Generator().manual_seed(5))
    c = t.sample(10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.float32


# ----------------------------------------------------------------------------- importance sampling
def gaussian_target(tau, log_constant=0.8):
    """Banana with zero curvature: N(0, diag(tau^2, 1)) left unnormalised, log Z known."""
    return make_target("banana", dim=2, curvature=0.0, scale=tau, log_constant=log_constant)


def test_importance_log_z_is_exact_when_q_equals_p():
    target = gaussian_target(1.7)
    flow = gaussian_flow([0.0, 0.0], [1.7, 1.0])
    res = importance_log_z(flow, target, 5000, chunk=1024)
    assert abs(res["log_z"] - target.log_z) < 1e-10
    assert abs(res["elbo"] - target.log_z) < 1e-10
    assert abs(res["ess_fraction"] - 1.0) < 1e-10 and abs(res["ess"] - 5000) < 1e-6
    assert res["log_z_se"] < 1e-10 and res["n"] == 5000


def _gaussian_kl(m, s, tau):
    """KL(N(m, diag s^2) || N(0, diag tau^2))."""
    return sum(math.log(t / si) + (si**2 + mi**2) / (2 * t**2) - 0.5 for mi, si, t in zip(m, s, tau))


def test_importance_log_z_with_mismatched_q():
    target = gaussian_target(1.7)
    m, s = [0.4, -0.3], [2.2, 0.8]
    flow = gaussian_flow(m, s)
    res = importance_log_z(flow, target, 20000, generator_seed=0)
    assert abs(res["log_z"] - target.log_z) < 3 * res["log_z_se"]
    assert 0 < res["log_z_se"] < 0.02  # the check has power
    assert 0.2 < res["ess_fraction"] < 0.95
    kl = _gaussian_kl(m, s, [1.7, 1.0])
    assert res["elbo"] < target.log_z - 0.1
    assert abs(res["elbo"] - (target.log_z - kl)) < 3 * res["elbo_se"]  # E[ELBO] = log Z - KL(q || p)


def test_importance_log_z_mixture_with_wide_gaussian_q():
    target = make_target("mixture2d", num_components=4, radius=2.0, std=0.6, log_constant=-0.5)
    res = importance_log_z(gaussian_flow([0.0, 0.0], [2.5, 2.5]), target, 40000, generator_seed=1)
    assert abs(res["log_z"] - target.log_z) < 3 * res["log_z_se"] and res["log_z_se"] < 0.02
    assert res["elbo"] < target.log_z


def test_standard_error_is_calibrated():
    """Across 40 independent estimates the spread of log Z_hat matches the reported delta-method SE."""
    target = gaussian_target(1.7)
    flow = gaussian_flow([0.4, -0.3], [2.2, 0.8])
    runs = [importance_log_z(flow, target, 4000, generator_seed=100 + i) for i in range(40)]
    est = torch.tensor([r["log_z"] for r in runs], dtype=torch.float64)
    se = sum(r["log_z_se"] for r in runs) / len(runs)
    assert 0.7 < float(est.std()) / se < 1.4
    assert abs(float(est.mean()) - target.log_z) < 4 * se / math.sqrt(len(runs))


def test_generator_seed_is_reproducible_and_leaves_global_rng_alone():
    target, flow = gaussian_target(1.7), gaussian_flow([0.4, -0.3], [2.2, 0.8])
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    a = importance_log_z(flow, target, 1000, generator_seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = importance_log_z(flow, target, 1000, generator_seed=3)
    c = importance_log_z(flow, target, 1000, generator_seed=4)
    assert a == b and a["log_z"] != c["log_z"]


def test_importance_log_z_restores_training_mode():
    flow = gaussian_flow([0.0, 0.0], [1.0, 1.0])
    flow.train()
    importance_log_z(flow, gaussian_target(1.0), 100)
    assert flow.training


# ----------------------------------------------------------------------------- pathwise gradient
def test_reverse_kl_loss_gradient_is_the_pathwise_kl_gradient():
    """q = N(m, s^2) per coordinate against p = N(0, tau^2): the MC gradient of the mean loss matches
    d/dm KL = m / tau^2 and d/dlog s KL = s^2 / tau^2 - 1 within 3 standard errors (100 batches of 200,
    seed 1)."""
    torch.manual_seed(1)
    tau = [1.7, 1.0]
    target = gaussian_target(tau[0])
    m, s = [0.6, -0.9], [0.7, 1.6]
    flow = gaussian_flow(m, s)
    t = flow.transform
    grads = []
    for _ in range(100):
        loss, x, log_q = reverse_kl_loss(flow, target, 200)
        assert loss.shape == (200,) and x.shape == (200, 2) and log_q.shape == (200,)
        gm, gs = torch.autograd.grad(loss.mean(), [t.m, t.log_s])
        grads.append(torch.cat([gm, gs]))
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    expected = torch.tensor(
        [m[0] / tau[0] ** 2, m[1] / tau[1] ** 2, s[0] ** 2 / tau[0] ** 2 - 1, s[1] ** 2 / tau[1] ** 2 - 1],
        dtype=torch.float64,
    )
    assert (se < 0.05).all()  # the comparison has power: every expected gradient is > 0.3 in size
    assert ((mean - expected).abs() < 3 * se).all(), (mean, expected, se)


def test_reverse_kl_loss_mean_is_kl_minus_log_z():
    tau = [1.7, 1.0]
    target = gaussian_target(tau[0])
    m, s = [0.6, -0.9], [0.7, 1.6]
    with torch.no_grad():
        loss, _, _ = reverse_kl_loss(gaussian_flow(m, s), target, 100_000)
    assert_mean(loss, _gaussian_kl(m, s, tau) - target.log_z, z=3.0)


# ----------------------------------------------------------------------------- training
def test_reverse_kl_training_reaches_log_z():
    """300 Adam steps of reverse KL (256 samples) fit a small RealNVP to a bimodal 2-component mixture:
    |log Z_hat - log Z| < 0.05 and ESS/n > 0.5 with 20000 importance samples."""
    from flowforge.flows.realnvp import RealNVP

    torch.manual_seed(0)
    target = make_target("mixture2d", num_components=2, radius=1.5, std=0.7)
    flow = RealNVP((2,), num_steps=4, hidden=(32, 32), actnorm=False)
    before = importance_log_z(flow, target, 20000, generator_seed=1)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss, _, _ = reverse_kl_loss(flow, target, 256)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(float(loss.mean().detach()))
    after = importance_log_z(flow, target, 20000, generator_seed=1)
    assert abs(after["log_z"] - target.log_z) < 0.05
    assert after["ess_fraction"] > 0.5 > before["ess_fraction"]
    assert before["elbo"] < after["elbo"] < target.log_z
    # the training loss approaches its bound -log Z from above
    assert sum(losses[-50:]) / 50 > -target.log_z - 0.02 and sum(losses[-50:]) / 50 < sum(losses[:10]) / 10 - 0.3


def test_reverse_kl_skips_actnorm_data_init():
    """With no data, ActNorm keeps its identity init under reverse KL, and a later log_prob(data) (an
    NLL evaluation) must not re-initialise it and overwrite what the reverse-KL fit learned."""
    from flowforge.flows.actnorm import ActNorm
    from flowforge.flows.realnvp import RealNVP

    flow = RealNVP((2,), num_steps=2, hidden=(8,), actnorm=True)
    reverse_kl_loss(flow, make_target("banana"), 8)
    norms = [m for m in flow.modules() if isinstance(m, ActNorm)]
    assert norms and all(bool(m.initialized) for m in norms)
    with torch.no_grad():
        for m in norms:
            m.loc.fill_(0.3)
    flow.log_prob(10 * torch.randn(16, 2))
    assert all(torch.all(m.loc == 0.3) for m in norms)
    skip_data_init(flow)  # idempotent


# ----------------------------------------------------------------------------- data module
def test_target_data_module_from_config():
    from conftest import compose
    from hydra.utils import instantiate

    cfg = compose(
        [
            "dataset=target",
            "dataset.name=funnel",
            "dataset.dim=4",
            "dataset.scale=1.5",
            "dataset.n_train=300",
            "dataset.n_val=200",
            "dataset.n_test=100",
        ]
    )
    assert list(cfg.dataset.shape) == [4]
    dm = instantiate(cfg.dataset)
    dm.setup()
    assert isinstance(dm.target, Funnel) and dm.target.dim == 4 and dm.target.scale == 1.5
    assert dm.shape == (4,) and dm.kind == "vector"
    tr, va, te = (dm.splits[s].tensors[0] for s in ("train", "val", "test"))
    assert tr.shape == (300, 4) and va.shape == (200, 4) and te.shape == (100, 4)
    # splits are exact target samples from per-split fixed seeds: reproducible and distinct
    assert torch.equal(tr, dm.target.sample(300, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(va[:100], te)
    dm2 = instantiate(cfg.dataset)
    dm2.setup()
    assert torch.equal(dm2.splits["test"].tensors[0], te)
    # the model config follows dataset.shape
    cfg = compose(["dataset=target", "dataset.name=banana", "dataset.dim=3", "model=realnvp", "model.num_steps=2"])
    assert instantiate(cfg.model).data_shape == (3,)


def test_target_data_module_defaults():
    from flowforge.data.target import TargetDataModule

    dm = TargetDataModule(n_train=50, n_val=20, n_test=20)
    dm.setup()
    assert isinstance(dm.target, GaussianMixture2D) and dm.shape == (2,) and len(dm.splits["train"]) == 50


# ----------------------------------------------------------------------------- errors
def test_unknown_target_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown target 'nope'.*\['banana', 'funnel', 'mixture2d'\]"):
        make_target("nope")


@pytest.mark.parametrize(
    "name,dim,options,needle",
    [
        ("banana", 1, {}, "dim >= 2"),
        ("funnel", 2.5, {}, "dim >= 2"),
        ("mixture2d", 3, {}, "set dataset.dim=2"),
        ("mixture2d", 2, {"std": -1.0}, "std must be a finite number > 0"),
        ("mixture2d", 2, {"num_components": 0}, "num_components must be an integer >= 1"),
        ("mixture2d", 2, {"num_components": 2.5}, "num_components must be an integer >= 1"),
        ("banana", 2, {"scale": 0.0}, "scale must be a finite number > 0"),
        ("banana", 2, {"curvature": float("nan")}, "curvature must be a finite number"),
        ("funnel", 2, {"log_constant": float("inf")}, "log_constant must be a finite number"),
        ("funnel", 2, {"curvature": 1.0}, "'curvature' does not apply to target 'funnel'"),
        ("banana", 2, {"scale": "wide"}, "scale must be"),
    ],
)
def test_bad_target_options(name, dim, options, needle):
    with pytest.raises(ConfigError, match=needle):
        make_target(name, dim, **options)


def test_null_options_take_defaults():
    assert make_target("funnel", 3, scale=None, log_constant=None).scale == 3.0


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"name": "spiral"}, "unknown target 'spiral'"),
        ({"dim": 3, "shape": [2]}, r"dataset.shape=\[2\] does not match dataset.dim=3"),
        ({"name": "banana", "dim": 3, "shape": [3, 1]}, "does not match"),
        ({"num_levels": 256}, "set it to null"),
        ({"n_train": 0}, "n_train must be a positive integer"),
        ({"name": "banana", "radius": 2.0}, "'radius' does not apply"),
    ],
)
def test_bad_data_module_config(kwargs, needle):
    from flowforge.data.target import TargetDataModule

    with pytest.raises(ConfigError, match=needle):
        TargetDataModule(**kwargs)


class HalfPlane(Target):
    """A density that is -inf (or NaN) for x_1 > 0: a flow with full support puts mass there."""

    name = "halfplane"

    def __init__(self, fill):
        super().__init__(2)
        self.fill = fill

    @property
    def log_z(self):
        return math.log(math.pi)

    def log_prob(self, x):
        lp = -0.5 * x.square().sum(1)
        return torch.where(x[:, 0] > 0, torch.full_like(lp, self.fill), lp)


@pytest.mark.parametrize("fill,needle", [(-math.inf, r"are -inf"), (math.nan, r"0 are -inf, \d+ NaN")])
def test_non_finite_weights_are_a_clear_error(fill, needle):
    flow = gaussian_flow([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(NonFiniteWeightsError, match=r"(\d+) of 2000 importance log weights") as info:
        importance_log_z(flow, HalfPlane(fill), 2000, generator_seed=0)
    msg = str(info.value)
    assert isinstance(info.value, FlowforgeError) and "halfplane" in msg and "-inf or NaN" in msg
    assert __import__("re").search(needle, msg)
    count = int(msg.split(" of ")[0])
    assert 800 < count < 1200  # about half the samples have x_1 > 0


def test_shape_mismatch_and_bad_sample_counts():
    flow = gaussian_flow([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match=r"shape \[3\].*R\^2.*dataset.shape=\[2\]"):
        reverse_kl_loss(flow, make_target("banana"), 8)
    with pytest.raises(ConfigError, match=r"shape \[3\]"):
        importance_log_z(flow, make_target("funnel"), 8)
    flow2 = gaussian_flow([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ConfigError, match="positive integer"):
        reverse_kl_loss(flow2, make_target("banana"), 0)
    with pytest.raises(ConfigError, match="positive integer chunk"):
        importance_log_z(flow2, make_target("banana"), 8, chunk=0)
    with pytest.raises(ConfigError, match="n >= 2"):
        importance_log_z(flow2, make_target("banana"), 1)
    with pytest.raises(DataError, match=r"expects points of shape \(batch, 2\)"):
        make_target("banana").log_prob(torch.zeros(4, 3))
