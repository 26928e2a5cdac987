"""Continuous normalizing flows: closed-form ODEs, brute-force Jacobians, adjoints, Hutchinson's trace,
RNODE terms, NFE counters, augmented CNFs and clear errors (float64 wherever exactness is checked)."""

import math

import pytest
import torch
from torch import nn

from flowforge.errors import ConfigError, ConvergenceError
from flowforge.estimators.logdet import as_estimator
from flowforge.estimators.trace import exact_divergence, exact_divergence_jvp, hutchinson_divergence
from flowforge.flows.cnf import CNF, nfe_summary, reset_nfe
from flowforge.flows.ffjord import FFJORD
from flowforge.flows.realnvp import RealNVP
from flowforge.nn.velocity import VelocityConvNet, VelocityMLP
from flowforge.testing import batch_jacobian_logdet

F64 = torch.float64
TIGHT = dict(method="dopri5", atol=1e-12, rtol=1e-12)


class Linear(nn.Module):
    """``v(x, t) = A x``: the flow is ``z = expm(A T) x`` with ``log_det = T tr(A)``."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, x):
        return x @ self.a.T


class Shifted(nn.Module):
    """``v(x, t) = A x + MLP(x, t)``: a Jacobian with a clearly nonzero trace (~tr A) for estimator checks."""

    def __init__(self, dim: int, shift: float = 2.0):
        super().__init__()
        self.mlp = VelocityMLP(dim, (16,), "tanh")
        self.a = nn.Parameter(shift * torch.eye(dim) + 0.3 * torch.randn(dim, dim))

    def forward(self, t, x):
        return x @ self.a.T + self.mlp(t, x)


def rand_a(d: int = 3) -> torch.Tensor:
    return 0.5 * torch.randn(d, d, dtype=F64)


# ---------------------------------------------------------------------------------------------- exactness
def test_linear_ode_matches_matrix_exponential():
    a, t1 = rand_a(), 0.7
    cnf = CNF(Linear(a), dim=3, t1=t1, adjoint=False, **TIGHT).double()
    x = torch.randn(5, 3, dtype=F64)
    z, log_det = cnf(x)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(t1 * a).T, atol=1e-8, rtol=0)
    torch.testing.assert_close(log_det, torch.full((5,), t1 * float(a.trace()), dtype=F64), atol=1e-8, rtol=0)
    x_back, ld_back = cnf.inverse_and_log_det(z)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(ld_back, -log_det, atol=1e-8, rtol=0)


@pytest.mark.parametrize("adjoint", [False, True])
def test_learnable_t1_gets_the_exact_gradient(adjoint):
    """d log_det / dT = tr(A) for the linear ODE; T = t1 theta^2 (theta = 1), so dL/dtheta = 2 t1 B tr(A)."""
    a = rand_a()
    cnf = CNF(Linear(a), dim=3, t1=0.8, train_t1=True, adjoint=adjoint, **TIGHT).double()
    _, log_det = cnf(torch.randn(4, 3, dtype=F64))
    log_det.sum().backward()
    expected = 2 * 0.8 * 4 * float(a.trace())
    assert abs(float(cnf.t1_sqrt_scale.grad) - expected) < 1e-7


def mlp_cnf(**kw):
    return CNF(VelocityMLP(3, (8, 8), "tanh"), dim=3, **{**dict(adjoint=False, atol=1e-10, rtol=1e-10), **kw}).double()


def conv_cnf(**kw):
    return CNF(
        VelocityConvNet(2, 4, (3, 3), "softplus"),
        shape=(2, 3, 3),
        **{**dict(adjoint=False, atol=1e-10, rtol=1e-10), **kw},
    ).double()


@pytest.mark.parametrize("make,shape", [(mlp_cnf, (3,)), (conv_cnf, (2, 3, 3))], ids=["mlp", "conv"])
def test_log_det_matches_brute_force_jacobian(make, shape):
    cnf = make()
    x = torch.randn(3, *shape, dtype=F64)
    _, log_det = cnf(x)
    ref = batch_jacobian_logdet(cnf, x, copies=False)  # the exact divergence: one example at a time is cheaper
    torch.testing.assert_close(log_det, ref, atol=1e-6, rtol=0)
    assert float(log_det.detach().abs().min()) > 1e-3  # a non-trivial flow: the identity would pass vacuously


@pytest.mark.parametrize("make,shape", [(mlp_cnf, (3,)), (conv_cnf, (2, 3, 3))], ids=["mlp", "conv"])
def test_inverse_round_trip_and_inverse_log_det(make, shape):
    cnf = make()
    x = torch.randn(4, *shape, dtype=F64)
    z, log_det = cnf(x)
    assert float((z - x).abs().max()) > 1e-2
    torch.testing.assert_close(cnf.inverse(z), x, atol=1e-8, rtol=0)
    x_back, ld_back = cnf.inverse_and_log_det(z)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(ld_back, -log_det, atol=1e-8, rtol=0)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_gradients_equal_backprop(trace):
    torch.manual_seed(0)
    direct = mlp_cnf(trace=trace, train_t1=True, t1=0.9, eval_trace=trace)
    adjoint = mlp_cnf(trace=trace, train_t1=True, t1=0.9, eval_trace=trace, adjoint=True)
    adjoint.load_state_dict(direct.state_dict())
    x0 = torch.randn(4, 3, dtype=F64)
    grads = []
    for cnf in (direct, adjoint):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(5)  # the same Hutchinson probes for both
        z, log_det = cnf(x)
        (0.5 * z.pow(2).sum() - log_det.sum()).backward()
        grads.append([x.grad] + [p.grad for p in cnf.parameters()])
    assert len(grads[0]) == len(list(direct.parameters())) + 1
    for g_direct, g_adjoint in zip(*grads):
        assert float(g_direct.abs().max()) > 0
        torch.testing.assert_close(g_adjoint, g_direct, atol=1e-6, rtol=1e-6)


def test_adjoint_seminorm_saves_backward_evaluations_not_accuracy():
    """The seminorm adjoint (default) takes fewer backward function evaluations than the full mixed norm at the
    same tolerance (measured 20 vs 26 at 1e-6), and both match direct backpropagation through a 1e-12 solve to
    1e-4 of the largest gradient (measured: 2e-5 seminorm, 3e-6 full norm: the seminorm trades some accuracy of
    the parameter gradients, below the noise of a minibatch gradient, for the evaluations)."""
    torch.manual_seed(0)
    runs = {}
    for name, opts in (
        ("direct", dict(adjoint=False)),
        ("semi", dict(adjoint=True)),
        ("full", dict(adjoint=True, adjoint_seminorm=False)),
    ):
        tol = 1e-12 if name == "direct" else 1e-6
        cnf = mlp_cnf(trace="exact", t1=1.0, atol=tol, rtol=tol, **opts)
        if runs:
            cnf.load_state_dict(runs["direct"][0].state_dict())
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
        z, log_det = cnf(x)
        (0.5 * z.pow(2).sum() - log_det.sum()).backward()
        runs[name] = (cnf, [p.grad.clone() for p in cnf.parameters()], cnf.nfe["backward"])
    assert runs["semi"][2] < runs["full"][2]
    for name in ("semi", "full"):
        scale = max(float(ref.abs().max()) for ref in runs["direct"][1])
        for g, ref in zip(runs[name][1], runs["direct"][1]):
            torch.testing.assert_close(g, ref, atol=1e-4 * scale, rtol=0)


# ---------------------------------------------------------------------------------------------- Hutchinson
def _within(samples: torch.Tensor, target: float, k: float = 3.0) -> bool:
    se = float(samples.std()) / math.sqrt(samples.numel())
    return abs(float(samples.mean()) - target) < k * se


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased_and_a_wrong_estimator_is_caught(probe):
    from flowforge.estimators.hutchinson import sample_probe

    torch.manual_seed(1)
    v = Shifted(3).double()
    n = 4000
    point = torch.randn(1, 3, dtype=F64).expand(n, 3).clone().requires_grad_(True)  # n copies, one probe each
    out = v(torch.tensor(0.2, dtype=F64), point)
    exact = float(exact_divergence(out, point)[0])
    eps = sample_probe(point, probe)
    assert abs(exact) > 1.0
    assert _within(hutchinson_divergence(out, point, eps), exact)
    # the forward-mode exact divergence agrees with the reverse-mode one
    jvp_div = exact_divergence_jvp(lambda xx: v(torch.tensor(0.2, dtype=F64), xx), point[:2])
    torch.testing.assert_close(jvp_div, torch.full((2,), exact, dtype=F64), atol=1e-12, rtol=0)
    # a probe with E[eps eps^T] = 1.21 I is biased by 21%: the same check must reject it
    assert not _within(hutchinson_divergence(out, point, 1.1 * eps), exact)


def test_hutchinson_log_det_of_a_solve_is_unbiased():
    """Probes fixed over the solve: the mean of the integrated estimates is the exact integral (rk4 grid)."""
    torch.manual_seed(2)
    velocity = Shifted(3, shift=1.0).double()
    kw = dict(method="rk4", step_size=0.25, adjoint=False)
    exact_cnf = CNF(velocity, dim=3, trace="exact", **kw).double()
    hutch_cnf = CNF(velocity, dim=3, trace="hutchinson", probe="rademacher", n_probes=2, **kw).double()
    x = torch.randn(1, 3, dtype=F64).expand(3000, 3)
    with torch.no_grad():
        exact = exact_cnf(x[:1])[1]
        z, estimates = hutch_cnf(x)
    torch.testing.assert_close(z, exact_cnf(x[:1])[0].expand(3000, 3), atol=1e-12, rtol=0)
    assert float(estimates.std()) > 1e-3 and abs(float(exact)) > 0.5
    assert _within(estimates, float(exact))
    assert not _within(estimates * 1.05, float(exact))


def test_eval_uses_the_exact_trace_in_low_dimensions():
    torch.manual_seed(3)
    cnf = mlp_cnf(trace="hutchinson", eval_exact_max_dim=3)
    assert cnf.logdet_estimator.stochastic and cnf.logdet_estimator.eval_name == "exact"
    x = torch.randn(3, 3, dtype=F64)
    cnf.eval()
    a, b = cnf(x)[1], cnf(x)[1]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    cnf.train()
    assert float((cnf(x)[1] - cnf(x)[1]).abs().max()) > 1e-6  # two probe draws differ in training


def test_inference_mode_autocast_and_copies():
    """Lightning evaluates under inference_mode (the Hutchinson VJP still needs autograd); bf16 autocast does
    not reach the solve; a model holding an RNODE graph can still be deep-copied (EMA callbacks)."""
    import copy

    torch.manual_seed(3)
    cnf = CNF(VelocityMLP(3, (8,)), dim=3, trace="hutchinson", kinetic=0.1, method="rk4", step_size=0.25)
    x = torch.randn(4, 3)
    cnf.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        ref = cnf(x)[1]
    with torch.inference_mode():
        torch.manual_seed(1)
        out = cnf(x)[1]
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        z, log_det = cnf(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(log_det, ref, atol=0, rtol=0)
    cnf.train()
    cnf(x)
    assert cnf.last_regularization.requires_grad
    twin = copy.deepcopy(cnf)
    assert twin.last_regularization is None and cnf.last_regularization is not None


# ---------------------------------------------------------------------------------------------- RNODE
def _kinetic_by_quadrature(a, x, t1, n=2001):
    ts = torch.linspace(0, t1, n, dtype=F64)
    vals = torch.stack([(x @ torch.linalg.matrix_exp(t * a).T @ a.T).pow(2).sum(1) for t in ts])  # ||A x(t)||^2
    w = torch.full((n,), 2.0, dtype=F64)
    w[1::2], w[0], w[-1] = 4.0, 1.0, 1.0  # Simpson's rule
    return (w[:, None] * vals).sum(0) * (t1 / (n - 1)) / 3


def test_rnode_kinetic_energy_matches_quadrature():
    a, t1 = rand_a(), 0.6
    cnf = CNF(Linear(a), dim=3, t1=t1, kinetic=0.5, adjoint=False, **TIGHT).double()
    x = torch.randn(4, 3, dtype=F64)
    cnf(x)
    ke = _kinetic_by_quadrature(a, x, t1)
    torch.testing.assert_close(cnf.last_regularization, 0.5 * ke, atol=1e-8, rtol=0)
    torch.testing.assert_close(float(cnf.last_reg_terms["kinetic"]), float(ke.mean()), atol=1e-8, rtol=0)
    assert cnf.last_regularization.requires_grad
    cnf.eval()
    cnf(x)
    assert cnf.last_regularization is None and cnf.last_reg_terms == {}
    off = CNF(Linear(a), dim=3, t1=t1, adjoint=False, **TIGHT).double()
    off(x)
    assert off.last_regularization is None and off.last_reg_terms == {}


def test_rnode_jacobian_term_estimates_the_frobenius_norm():
    """For v = A x: int ||eps^T A||^2 dt has mean T ||A||_F^2."""
    torch.manual_seed(4)
    a, t1 = rand_a(), 0.6
    cnf = CNF(Linear(a), dim=3, t1=t1, jacobian=1.0, method="rk4", step_size=0.2, adjoint=False).double()
    cnf(torch.randn(20000, 3, dtype=F64))
    jf = cnf.last_regularization
    target = t1 * float(a.pow(2).sum())
    assert _within(jf, target) and not _within(jf, 1.1 * target)
    # both terms are reported while RNODE is on; only the weighted ones enter last_regularization
    assert abs(float(cnf.last_reg_terms["jacobian"]) - float(jf.mean())) < 1e-12
    assert float(cnf.last_reg_terms["kinetic"]) > 0


# ---------------------------------------------------------------------------------------------- NFE
def test_nfe_counts_forward_and_adjoint_backward_and_resets():
    flow = FFJORD((2,), estimator={"name": "exact"}, num_blocks=2, hidden=(8,), method="rk4", step_size=0.25)
    x = torch.randn(6, 2)
    reset_nfe(flow)
    z, log_det = flow(x)
    assert nfe_summary(flow) == {"nfe/forward": 2 * 16, "nfe/backward": 0}  # 4 rk4 steps x 4 stages per block
    (z.sum() + log_det.sum()).backward()
    summary = nfe_summary(flow)
    assert summary["nfe/forward"] == 32 and summary["nfe/backward"] == 32
    reset_nfe(flow)
    assert nfe_summary(flow) == {"nfe/forward": 0, "nfe/backward": 0}
    direct = FFJORD((2,), estimator={"name": "exact"}, hidden=(8,), method="rk4", step_size=0.25, adjoint=False)
    direct(x)[1].sum().backward()
    assert nfe_summary(direct) == {"nfe/forward": 16, "nfe/backward": 0}
    assert nfe_summary(RealNVP((2,), num_steps=1, hidden=(4,))) == {}


# ---------------------------------------------------------------------------------------------- augmented
class Decoupled(nn.Module):
    """``v(x, a) = (f(x, t), M a)``: ``a`` never influences ``x``."""

    def __init__(self, f: nn.Module, m: torch.Tensor, d: int):
        super().__init__()
        self.f, self.d = f, d
        self.m = nn.Parameter(m)

    def forward(self, t, s):
        return torch.cat([self.f(t, s[:, : self.d]), s[:, self.d :] @ self.m.T], dim=1)


@pytest.mark.parametrize("kind", ["rotation", "scaling"])
def test_augmented_cnf_is_a_lower_bound(kind):
    """A rotation of ``a`` keeps N(0, I): the bound is tight sample by sample.  A scaling ``a' = c a`` loses
    ``E[gap] = A ((e^{2cT} - 1)/2 - cT) > 0`` nats."""
    torch.manual_seed(6)
    d, aug, c = 2, 2, 0.4
    f = VelocityMLP(d, (8,), "tanh").double()
    m = torch.tensor([[0.0, 0.5], [-0.5, 0.0]]) if kind == "rotation" else c * torch.eye(2)
    kw = dict(method="rk4", step_size=0.05, adjoint=False)
    plain = CNF(f, dim=d, **kw).double()
    augmented = CNF(Decoupled(f, m.double(), d), dim=d, augment_dim=aug, **kw).double()
    n = 2000
    x = torch.randn(1, d, dtype=F64).expand(n, d)

    def normal_logp(z):
        return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)

    with torch.no_grad():
        zx, ld = plain(x[:1])
        exact = float(normal_logp(zx) + ld)
        z, log_det = augmented(x)
        bound = normal_logp(z) + log_det
    assert z.shape == (n, d + aug) and log_det.shape == (n,)
    torch.testing.assert_close(z[:, :d], zx.expand(n, d), atol=1e-12, rtol=0)
    if kind == "rotation":
        # (rk4 preserves the norm of a rotated vector up to its O(h^4) error)
        torch.testing.assert_close(bound, torch.full((n,), exact, dtype=F64), atol=1e-7, rtol=0)
    else:
        gap = aug * ((math.exp(2 * c) - 1) / 2 - c)
        assert float(bound.mean()) < exact
        assert _within(bound, exact - gap)
    with torch.no_grad():  # (rk4 forward then backward inverts up to its O(h^4) error)
        torch.testing.assert_close(augmented.inverse(z[:5]), x[:5], atol=1e-7, rtol=0)
        x_back, ld_back = augmented.inverse_and_log_det(z[:5])
    torch.testing.assert_close(x_back, x[:5], atol=1e-7, rtol=0)
    torch.testing.assert_close(ld_back, -log_det[:5], atol=1e-7, rtol=0)


def test_augmented_ffjord_shapes():
    flow = FFJORD(
        (2,), estimator={"name": "exact"}, num_blocks=2, hidden=(8,), augment_dim=3, method="rk4", step_size=0.5
    )
    x = torch.randn(5, 2)
    z, log_det = flow(x)
    assert z.shape == (5, 5) and log_det.shape == (5,)
    assert flow.base.loc.shape[-1] == 5 and flow.log_prob(x).shape == (5,)
    assert flow.sample(4).shape == (4, 2)
    assert [b.augment_dim for b in flow.transform.transforms] == [3, 0]


# ---------------------------------------------------------------------------------------------- builder
def test_ffjord_estimator_resolution_and_float64_multiscale():
    toy = FFJORD((2,), estimator={"name": "auto", "auto_exact_max_dim": 2}, hidden=(8,))
    assert toy.transform.transforms[0].logdet_estimator.name == "exact"
    vec = FFJORD((5,), estimator={"name": "auto", "neumann_grad": True}, hidden=(8,))
    est = vec.transform.transforms[0].logdet_estimator
    assert est.name == "hutchinson" and est.stochastic and est.eval_name == "hutchinson"
    hutch = FFJORD((2,), estimator={"name": "hutchinson", "probe": "rademacher", "n_probes": 2}, hidden=(8,))
    block = hutch.transform.transforms[0]
    assert (block.trace, block.probe, block.n_probes, block.eval_trace) == ("hutchinson", "rademacher", 2, "exact")
    image = FFJORD(
        (1, 4, 4),
        estimator={"name": "exact"},
        channels=4,
        kernels=(3, 3),
        num_scales=2,
        blocks_per_scale=1,
        method="rk4",
        step_size=0.5,
        num_levels=17,
        logit_alpha=0.05,
    ).double()
    assert sum(isinstance(m, CNF) for m in image.modules()) == 3  # 1 + 1 after the squeeze, 1 in the last scale
    x = torch.rand(2, 1, 4, 4, dtype=F64) * 0.9 + 0.05
    lp = image.log_prob(x)
    assert lp.dtype == F64 and lp.shape == (2,) and torch.isfinite(lp).all()


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ConfigError, match="dopri5"):
        CNF(VelocityMLP(2, (4,)), dim=2, method="rk5")
    with pytest.raises(ConfigError, match="step_size"):
        CNF(VelocityMLP(2, (4,)), dim=2, method="rk4")
    with pytest.raises(ConfigError, match="softplus"):
        VelocityMLP(2, (4,), act="relu6")
    with pytest.raises(ConfigError, match="swish"):
        VelocityConvNet(1, 4, (3, 3), act="gelu")
    for name in ("roulette", "power_series"):
        with pytest.raises(ConfigError, match="exact\\|hutchinson\\|auto"):
            FFJORD((2,), estimator={"name": name})
    with pytest.raises(ConfigError, match="CNF trace estimator"):
        as_estimator({"name": "hutchinson"}, 10)
    with pytest.raises(ConfigError, match="augment_dim"):
        FFJORD((1, 4, 4), augment_dim=2, num_levels=17, logit_alpha=0.05)
    with pytest.raises(ConfigError, match="trace"):
        CNF(VelocityMLP(2, (4,)), dim=2, trace="roulette")


class Explosive(nn.Module):
    def forward(self, t, x):
        return x.pow(2)  # x(t) = x0 / (1 - x0 t): blows up at t = 1/x0


def test_failed_solve_is_a_convergence_error():
    cnf = CNF(Explosive(), dim=1, method="dopri5", atol=1e-6, rtol=1e-6, max_num_steps=200, adjoint=False)
    with pytest.raises(ConvergenceError, match="atol"):
        cnf(torch.full((2, 1), 4.0))
    fixed = CNF(Explosive(), dim=1, method="euler", step_size=0.25, adjoint=False)
    with pytest.raises(ConvergenceError, match="step_size"):
        fixed(torch.full((2, 1), 1e3))
