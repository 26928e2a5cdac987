"""Log-det estimators of residual blocks against exact references.

Statistical tests use fixed seeds and state their tolerances: an unbiased estimator's mean over M
independent draws must lie within 3 standard errors of the exact value; a biased one (the truncated
series) must be detectably off; the Neumann surrogate's gradient must match the exact gradient in
expectation (mean squared z-score of the gradient coordinates near 1, while a wrong gradient series
gives a large one).  Backward-in-forward must reproduce plain autograd exactly for the same draws.
"""

import math

import pytest
import torch
from torch import nn

from flowforge.errors import ConfigError
from flowforge.estimators import LogDetEstimator, RouletteDistribution
from flowforge.estimators.exact import exact_logdet, full_jacobian
from flowforge.estimators.logdet import linearize
from flowforge.nn.lipschitz_net import lipschitz_mlp
from flowforge.testing import jacobian_matrix, mean_over_copies


class ScaledTanhNet(nn.Module):
    """g(x) = W2 tanh(W1 x + b) with ||W1|| ||W2|| = lip (exact SVD scaling); no linearize method,
    so the estimators use their torch.func fallback on it."""

    def __init__(self, d: int, hidden: int = 16, lip: float = 0.7):
        super().__init__()
        w1, w2 = torch.randn(hidden, d), torch.randn(d, hidden)
        w1 = w1 / torch.linalg.matrix_norm(w1, 2)
        w2 = w2 / torch.linalg.matrix_norm(w2, 2) * lip
        self.w1, self.w2 = nn.Parameter(w1), nn.Parameter(w2)
        self.b = nn.Parameter(torch.randn(hidden) * 0.5)

    def forward(self, x):
        return torch.tanh(x @ self.w1.T + self.b) @ self.w2.T


def exact_reference(g, x):
    """log det(I + J_g) by brute-force autograd Jacobians (independent of the estimator code)."""
    j = jacobian_matrix(g, x)
    return torch.linalg.slogdet(torch.eye(x.shape[1], dtype=x.dtype) + j)[1]


def exact_reference_differentiable(g, x):
    """As :func:`exact_reference`, keeping the graph (for exact gradients in parameters and inputs)."""
    out = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda v: g(v[None])[0], xi, create_graph=True)
        out.append(torch.linalg.slogdet(torch.eye(x.shape[1], dtype=x.dtype) + j)[1])
    return torch.stack(out)


def nets(d, lip):
    torch.manual_seed(1)
    a = ScaledTanhNet(d, lip=lip).double()
    b = lipschitz_mlp(d, [16, 16], act="lipswish", coeff=lip, zero_last=False).double()
    b.eval()
    with torch.no_grad():
        b(torch.zeros(1, d, dtype=torch.float64))  # initialise the power iteration
    return {"tanh": a, "lipschitz_mlp": b}


def draws(est, g, x, m, copies=1):
    """``m`` independent draws of the estimate at ``x``, each the mean over ``copies`` copies of ``x`` in one call
    (:func:`flowforge.testing.mean_over_copies`)."""
    with torch.no_grad():
        return torch.stack([mean_over_copies(lambda v: est(g, v, training=True)[1], x, copies) for _ in range(m)])


@pytest.mark.parametrize("d", [3, 6])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="roulette", dist="geometric", p=0.5, probe="gaussian"),
        dict(name="roulette", dist="poisson", lam=2.0, probe="rademacher"),
        dict(name="roulette", dist="geometric", p=0.5, probe="rademacher", n_exact_terms=0),
        dict(name="roulette", dist="poisson", lam=1.0, probe="gaussian", n_exact_terms=1),
    ],
)
@pytest.mark.slow
def test_roulette_hutchinson_unbiased(d, kwargs):
    torch.manual_seed(0)
    for gname, g in nets(d, lip=0.8).items():
        x = torch.randn(3, d, dtype=torch.float64)
        exact = exact_reference(g, x)
        torch.manual_seed(123)
        est = draws(LogDetEstimator(**kwargs), g, x, 600, copies=5)
        mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
        z = (mean - exact) / se
        assert (z.abs() < 3).all(), f"{gname} {kwargs}: mean {mean} vs exact {exact}, z = {z} (tolerance 3 SE)"


class LinearG(nn.Module):
    """g(x) = A x for a fixed symmetric A with eigenvalues (0.9, 0.5): log det(I + A) = log 1.9 + log 1.5."""

    def __init__(self):
        super().__init__()
        q = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64))[0]
        self.a = nn.Parameter(q @ torch.diag(torch.tensor([0.9, 0.5], dtype=torch.float64)) @ q.T)

    def forward(self, x):
        return x @ self.a.T


def test_truncated_series_is_biased_and_roulette_is_not():
    """Two truncated terms miss log det(I + A) by -0.18 (many standard errors); the roulette estimator
    with the same expected cost does not."""
    torch.manual_seed(0)
    g = LinearG()
    x = torch.randn(2, 2, dtype=torch.float64)
    exact = torch.full((2,), math.log(1.9) + math.log(1.5), dtype=torch.float64)
    assert torch.allclose(exact_reference(g, x), exact)
    torch.manual_seed(5)
    trunc = draws(LogDetEstimator("power_series", n_terms=2, probe="rademacher"), g, x, 1000)
    z_trunc = (trunc.mean(0) - exact) / (trunc.std(0) / math.sqrt(1000))
    assert (z_trunc < -6).all(), f"truncated series should be visibly biased (low), z = {z_trunc}"
    torch.manual_seed(5)
    roul = draws(LogDetEstimator("roulette", n_exact_terms=1, probe="rademacher"), g, x, 3000)
    z_roul = (roul.mean(0) - exact) / (roul.std(0) / math.sqrt(3000))
    assert (z_roul.abs() < 3).all(), f"roulette should be unbiased, z = {z_roul}"


@pytest.mark.parametrize("gname", ["tanh", "lipschitz_mlp"])
def test_exact_estimator_matches_brute_force(gname):
    g = nets(4, lip=0.9)[gname]
    x = torch.randn(5, 4, dtype=torch.float64)
    _, ld, _ = LogDetEstimator("exact")(g, x, training=True)
    assert torch.allclose(ld, exact_reference(g, x), atol=1e-10)
    y, jvp = linearize(g, x)
    assert torch.allclose(full_jacobian(jvp, x), jacobian_matrix(g, x), atol=1e-12)


def test_linearized_jvp_matches_autograd_for_every_activation():
    from flowforge.nn.activations import LIPSCHITZ_ACTIVATIONS

    for act in LIPSCHITZ_ACTIVATIONS:
        torch.manual_seed(0)
        g = lipschitz_mlp(4, [8], act=act, coeff=0.9, preact=True, zero_last=False).double()
        x = torch.randn(3, 4, dtype=torch.float64)
        g(x)  # power iteration
        y, jvp = linearize(g, x)
        v = torch.randn_like(x)
        ref_y, ref = torch.func.jvp(g, (x,), (v,))
        assert torch.allclose(y, ref_y, atol=1e-12), act
        assert torch.allclose(jvp(v), ref, atol=1e-10), act


def _flat_grad(scalar, params):
    grads = torch.autograd.grad(scalar, params, allow_unused=True)  # (the last bias does not enter log-dets)
    return torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1) for g, p in zip(grads, params)])


@pytest.mark.parametrize("gname", ["tanh", "lipschitz_mlp"])
@pytest.mark.slow
def test_neumann_gradient_unbiased(gname):
    """E[grad of the Neumann surrogate] = grad of the exact log-det (parameters and inputs together).

    The gradient coordinates share each draw's probe, so they are tested through scalar projections
    (the exact gradient's direction and three fixed random directions): each projected mean must lie
    within 3.5 standard errors of the exact value.  A biased gradient series fails the same test."""
    torch.manual_seed(0)
    g = nets(3, lip=0.7)[gname]
    params = [p for p in g.parameters() if p.requires_grad]
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    exact = _flat_grad(exact_reference_differentiable(g, x).sum(), params + [x])
    dirs = torch.cat([exact[None] / exact.norm(), torch.randn(3, exact.numel(), dtype=torch.float64)])

    def z_scores(est, m, copies=5):
        def draw():  # one call on `copies` copies of x (mean_over_copies)
            value = mean_over_copies(lambda v: est(g, v, training=True)[1], x, copies)
            return dirs @ _flat_grad(value.sum(), params + [x])

        proj = torch.stack([draw() for _ in range(m)])
        return (proj.mean(0) - dirs @ exact) / (proj.std(0) / math.sqrt(m))

    torch.manual_seed(7)
    z = z_scores(LogDetEstimator("roulette", n_exact_terms=2, neumann_grad=True, probe="gaussian"), 500)
    assert (z.abs() < 3.5).all(), f"Neumann gradient projections off by {z} standard errors (tolerance 3.5)"
    if gname != "tanh":  # (this net's Jacobian is small: a one-term series is too close to tell apart)
        return
    torch.manual_seed(7)  # negative control: one term, no tail
    z_bad = z_scores(LogDetEstimator("power_series", n_terms=1, neumann_grad=True, probe="gaussian"), 500)
    assert z_bad.abs().max() > 3.5, f"the same test should reject a biased gradient series (z = {z_bad})"


def test_neumann_value_is_the_estimate_not_the_surrogate():
    g = nets(3, lip=0.8)["lipschitz_mlp"]
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(3)
    plain = LogDetEstimator("roulette", neumann_grad=False)(g, x, training=True)[1]
    torch.manual_seed(3)
    neumann = LogDetEstimator("roulette", neumann_grad=True)(g, x, training=True)[1]
    assert torch.allclose(plain, neumann, atol=1e-12)


@pytest.mark.parametrize("neumann", [False, True])
@pytest.mark.parametrize("weights", ["uniform", "per_sample"])
@pytest.mark.parametrize("gname", ["tanh", "lipschitz_mlp"])
def test_mem_eff_matches_autograd(neumann, weights, gname):
    """Backward-in-forward gives the same parameter and input gradients as plain autograd for the
    same draws, including per-sample weighted losses (which the reference got wrong)."""
    g = nets(3, lip=0.8)[gname]
    params = [p for p in g.parameters() if p.requires_grad]
    w = torch.ones(5, dtype=torch.float64) * 0.3 if weights == "uniform" else torch.rand(5, dtype=torch.float64)
    grads = {}
    for mem_eff in (False, True):
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        torch.manual_seed(11)
        est = LogDetEstimator("roulette", n_exact_terms=2, neumann_grad=neumann, mem_eff=mem_eff)
        gx, ld, _ = est(g, x, training=True)
        loss = (w * (ld + (x + gx).pow(2).sum(1))).sum()
        grads[mem_eff] = torch.autograd.grad(loss, params + [x])
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()


def test_roulette_distribution_tails():
    geo = RouletteDistribution("geometric", p=0.5)
    assert geo.survival(1) == 1.0 and geo.survival(3) == 0.25
    poi = RouletteDistribution("poisson", lam=2.0)
    assert math.isclose(poi.survival(1), 1 - math.exp(-2))
    torch.manual_seed(0)
    for r in (geo, poi):
        n = torch.tensor([r.sample() for _ in range(20000)], dtype=torch.float64)
        assert abs(n.mean() - r.mean()) < 4 * n.std() / math.sqrt(len(n)), r.dist
        for j in (1, 2, 4):
            emp = float((n >= j).double().mean())
            assert abs(emp - r.survival(j)) < 0.015, (r.dist, j, emp)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(name="taylor"), "unknown log-det estimator"),
        (dict(name="roulette", dist="binomial"), "roulette distribution"),
        (dict(name="roulette", p=1.5), "p must be in"),
        (dict(name="roulette", probe="uniform"), "probe"),
        (dict(name="exact", neumann_grad=True), "neumann_grad and mem_eff apply"),
        (dict(name="power_series", n_terms=0), "n_terms"),
        (dict(name="roulette", n_probes=-1), "n_probes"),
    ],
)
def test_bad_estimator_config(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        LogDetEstimator(**kwargs)


def test_exact_refuses_high_dimensions():
    with pytest.raises(ConfigError, match="estimator=roulette"):
        exact_logdet(lambda v: 0.1 * v, torch.zeros(1, 2000))
