"""Flows on manifolds (unit sphere, probability simplex): closed-form volume ratios against brute-force
tangent-space Jacobians (float64), exact inverses, base densities normalised by quadrature, the vMF
sampler's moments, end-to-end normalisation and training of SphereFlow, the Hydra / Lightning wiring and
the clear errors."""

import math

import numpy as np
import pytest
import torch
from conftest import compose, fast_dev_run, instantiate_model

from flowforge.data.sphere import DirichletMixtureDataModule, VMFMixtureDataModule
from flowforge.errors import ConfigError, DataError
from flowforge.flows.base import Compose, Inverse
from flowforge.flows.manifold_distributions import (
    Dirichlet,
    UniformSphere,
    VonMisesFisher,
    log_sphere_area,
    mean_resultant_length,
    sample_vmf,
    vmf_log_normalizer,
)
from flowforge.flows.manifold_flow import SimplexFlow, SphereFlow
from flowforge.flows.simplex import Calibration, GeneralizedCalibration
from flowforge.flows.sphere import NormalizedAffine, NormalizedLinear, NormalizedTranslation
from flowforge.testing import simplex_volume_ratio, sphere_volume_ratio
from flowforge.training.callbacks import SampleFigures
from flowforge.training.visualize import manifold_figure

ATOL = 1e-6
SPHERE_LAYERS = {"translation": NormalizedTranslation, "linear": NormalizedLinear, "affine": NormalizedAffine}
SIMPLEX_LAYERS = {"calibration": Calibration, "generalized": GeneralizedCalibration}


def randomized(layer, scale=0.5):
    """A float64 layer with every parameter moved well off the identity."""
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def sphere_points(n, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def simplex_points(n, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(1.5 * torch.randn(n, dim, generator=g, dtype=torch.float64), 1)


def sphere_quadrature(log_p, n_u=200, n_phi=400):
    """``int_{S^2} exp(log_p(x)) dA``: Gauss-Legendre in ``u = cos(theta)`` (dA = du dphi), trapezoid in phi."""
    u, w = (torch.tensor(a) for a in np.polynomial.legendre.leggauss(n_u))
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    uu, pp = torch.meshgrid(u, phi, indexing="ij")
    r = torch.sqrt(1 - uu**2)
    x = torch.stack([r * pp.cos(), r * pp.sin(), uu], -1).reshape(-1, 3)
    with torch.no_grad():
        f = log_p(x).exp().reshape(n_u, n_phi)
    return float((f.sum(1) * w).sum() * (2 * math.pi / n_phi))


def simplex_quadrature(log_p, n=100):
    """``int exp(log_p(p)) dA`` over the 2-simplex in R^3 (surface measure): ``p = (s, (1-s) t, (1-s)(1-t))``,
    ``dA = sqrt(3) (1 - s) ds dt``, Gauss-Legendre in s and t."""
    g, w = np.polynomial.legendre.leggauss(n)
    g, w = torch.tensor((g + 1) / 2), torch.tensor(w / 2)
    s, t = torch.meshgrid(g, g, indexing="ij")
    p = torch.stack([s, (1 - s) * t, (1 - s) * (1 - t)], -1).reshape(-1, 3)
    with torch.no_grad():
        f = log_p(p).exp().reshape(n, n) * math.sqrt(3) * (1 - s)
    return float((f * w[:, None] * w[None, :]).sum())


# ----------------------------------------------------------------------------- sphere transforms
@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("kind", list(SPHERE_LAYERS))
def test_sphere_log_ratio_matches_tangent_jacobian(kind, d):
    layer = randomized(SPHERE_LAYERS[kind](d))
    x = sphere_points(6, d)
    z, log_det = layer(x)
    for method in ("gram", "sandwich"):
        ref = sphere_volume_ratio(layer, x, method).log()
        torch.testing.assert_close(log_det, ref, atol=ATOL, rtol=0)
    assert (log_det - log_det.mean()).abs().max() > 1e-3  # non-trivial parameters: the ratio varies


def assert_inverts(layer, x, z, log_det, volume_ratio):
    """``z = layer(x)`` inverts to ``x`` (1e-10) through ``inverse`` and ``inverse_and_log_det``, whose log-ratio
    is minus the forward one and matches the brute-force ``volume_ratio`` of the inverse map at ``z``."""
    x_back, inv_log_det = layer.inverse_and_log_det(z)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.inverse(z), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv_log_det, -log_det, atol=1e-10, rtol=0)
    ref = volume_ratio(lambda v: layer.inverse(v), z).log()
    torch.testing.assert_close(inv_log_det, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("kind", list(SPHERE_LAYERS))
def test_sphere_layer_stays_on_sphere_and_inverts_exactly(kind, d):
    layer = randomized(SPHERE_LAYERS[kind](d))
    x = sphere_points(8, d)
    z, log_det = layer(x)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_inverts(layer, x, z, log_det, sphere_volume_ratio)


def assert_chain(flow, x, volume_ratio):
    """A composed manifold flow: its log-det equals the brute-force volume ratio of the whole chain, it inverts,
    and the inverse's log-det is minus the forward's."""
    z, log_det = flow(x)
    torch.testing.assert_close(log_det, volume_ratio(flow, x).log(), atol=ATOL, rtol=0)
    x_back, inv_log_det = flow.inverse_and_log_det(z)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv_log_det, -log_det, atol=1e-10, rtol=0)


def test_sphere_composition_chains_ratios_and_inverts():
    d = 4
    flow = Compose(
        [
            randomized(NormalizedTranslation(d)),
            randomized(NormalizedLinear(d)),
            randomized(NormalizedAffine(d)),
            Inverse(randomized(NormalizedAffine(d))),
        ]
    )
    assert_chain(flow, sphere_points(5, d), sphere_volume_ratio)


def test_normalized_affine_is_linear_after_translation():
    """(M x + k) / ||M x + k|| with k = M u equals the normalised linear map after the normalised translation u."""
    d = 3
    affine = randomized(NormalizedAffine(d))
    translation, linear = NormalizedTranslation(d).double(), NormalizedLinear(d).double()
    with torch.no_grad():
        translation.v.copy_(affine.v)
        linear.linear.load_state_dict(affine.linear.state_dict())
    x = sphere_points(5, d)
    z_ref, ld_ref = Compose([translation, linear])(x)
    z, ld = affine(x)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, ld_ref, atol=1e-12, rtol=0)
    m, k = affine.linear.matrix(), affine.k
    y = x @ m.T + k
    torch.testing.assert_close(z, y / y.norm(dim=1, keepdim=True), atol=1e-12, rtol=0)
    # the matrix-determinant-lemma form |det(M + k x^T)| / ||M x + k||^d
    lemma = torch.stack([torch.linalg.det(m + torch.outer(k, xi)).abs().log() for xi in x]) - d * y.norm(dim=1).log()
    torch.testing.assert_close(ld, lemma, atol=1e-10, rtol=0)


def test_translation_inverse_is_stable_near_the_ball_boundary():
    d = 3
    layer = NormalizedTranslation(d).double()
    k = torch.tensor([0.0, 0.6, -0.799], dtype=torch.float64)  # ||k|| = 0.99960
    layer.set_k(k)
    torch.testing.assert_close(layer.k, k, atol=1e-14, rtol=0)
    x = torch.cat([sphere_points(50, d), -k[None] / k.norm()])  # includes the point opposite k
    z, log_det = layer(x)
    x_back, inv = layer.inverse_and_log_det(z)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv, -log_det, atol=1e-8, rtol=0)


def test_translation_constraint_on_k():
    layer = NormalizedTranslation(3)
    with pytest.raises(ConfigError, match=r"\|\|k\|\| < 1"):
        layer.set_k(torch.tensor([0.6, 0.8, 0.0]))
    with pytest.raises(ConfigError, match=r"\|\|k\|\| < 1"):
        NormalizedTranslation(3, k=torch.tensor([2.0, 0.0, 0.0]))
    with torch.no_grad():
        layer.v.fill_(1e4)  # any free parameter maps into the open unit ball
    assert float(layer.k.detach().norm()) < 1
    affine = NormalizedAffine(3, matrix=torch.diag(torch.tensor([0.5, 1.0, 1.0])))
    with pytest.raises(ConfigError, match=r"M\^-1 k"):
        affine.set_k(torch.tensor([0.6, 0.0, 0.0]))  # ||M^-1 k|| = 1.2
    affine.set_k(torch.tensor([0.0, 0.6, 0.0]))
    torch.testing.assert_close(affine.k, torch.tensor([0.0, 0.6, 0.0]), atol=1e-6, rtol=0)


def test_inverse_and_log_det_is_differentiable():
    """Reverse-KL needs gradients through the closed-form inverses: autograd agrees with finite differences."""
    torch.manual_seed(3)
    flow = SphereFlow([3], num_layers=2, kind="affine", manifold="sphere", init_scale=0.3).double()
    z = sphere_points(4, 3)
    layer = flow.transform.transforms[0]

    def loss():
        x, ld = flow.transform.inverse_and_log_det(z)
        return (x[:, 0] + ld).sum()

    (grad,) = torch.autograd.grad(loss(), layer.v)
    assert grad.abs().max() > 1e-3
    direction = torch.randn_like(layer.v)
    eps = 1e-6
    with torch.no_grad():
        layer.v.add_(eps * direction)
        up = float(loss())
        layer.v.sub_(2 * eps * direction)
        down = float(loss())
        layer.v.add_(eps * direction)
    assert abs((up - down) / (2 * eps) - float((grad * direction).sum())) < 1e-6
    x, log_q = flow.rsample_and_log_prob(16)
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- simplex transforms
@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("kind", list(SIMPLEX_LAYERS))
def test_simplex_log_ratio_matches_tangent_jacobian(kind, n):
    layer = randomized(SIMPLEX_LAYERS[kind](n))
    p = simplex_points(6, n)
    q, log_det = layer(p)
    for method in ("gram", "sandwich"):
        torch.testing.assert_close(log_det, simplex_volume_ratio(layer, p, method).log(), atol=ATOL, rtol=0)
    assert (log_det - log_det.mean()).abs().max() > 1e-3


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("kind", list(SIMPLEX_LAYERS))
def test_simplex_layer_stays_on_simplex_and_inverts_exactly(kind, n):
    layer = randomized(SIMPLEX_LAYERS[kind](n))
    p = simplex_points(8, n)
    q, log_det = layer(p)
    assert (q > 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_inverts(layer, p, q, log_det, simplex_volume_ratio)


def test_simplex_composition():
    n = 4
    flow = Compose([randomized(Calibration(n)), randomized(GeneralizedCalibration(n)), randomized(Calibration(n))])
    assert_chain(flow, simplex_points(5, n), simplex_volume_ratio)


def test_generalized_calibration_only_uses_the_log_ratio_block_of_A():
    n, b = 4, [0.3, -0.2, 0.5, 0.1]
    p = simplex_points(6, n)
    cal = Calibration(n, a=1.7).double()
    cal.set_offset(b)
    gen = GeneralizedCalibration(n).double()
    gen.set_matrix(cal.a.detach() * torch.eye(n, dtype=torch.float64))
    gen.set_offset(torch.tensor(b, dtype=torch.float64) + 3.0)  # a common shift of b is a gauge
    q_ref, ld_ref = cal(p)
    q, ld = gen(p)
    torch.testing.assert_close(q, q_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, ld_ref, atol=1e-12, rtol=0)
    # A -> A + 1 w^T + c 1 1^T keeps A 1 parallel to 1 and changes nothing
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, n, generator=g, dtype=torch.float64)
    base = base - base.mean(1, keepdim=True) + 2 * torch.eye(n, dtype=torch.float64)  # rows sum to 2
    shifted = base + torch.outer(torch.ones(n, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))
    one, two = GeneralizedCalibration(n).double(), GeneralizedCalibration(n).double()
    one.set_matrix(base)
    two.set_matrix(shifted)
    torch.testing.assert_close(two(p)[0], one(p)[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(two(p)[1], one(p)[1], atol=1e-12, rtol=0)
    expected = torch.softmax(torch.log(p) @ shifted.T, 1)
    torch.testing.assert_close(two(p)[0], expected, atol=1e-12, rtol=0)
    # the reported representative acts the same
    torch.testing.assert_close(torch.softmax(torch.log(p) @ one.matrix().T, 1), expected, atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="eigenvector"):
        GeneralizedCalibration(n, matrix=base + torch.outer(torch.arange(n, dtype=torch.float64), torch.ones(n)))
    with pytest.raises(ConfigError, match="a must be"):
        Calibration(n, a=-1.0)


# ----------------------------------------------------------------------------- base distributions
def test_uniform_and_vmf_integrate_to_one_on_s2():
    assert abs(sphere_quadrature(UniformSphere(3).double().log_prob) - 1) < 1e-10
    for kappa in (0.5, 10.0, 40.0):
        vmf = VonMisesFisher(3, mu=[1.0, 2.0, -0.5], kappa=kappa).double()
        assert abs(sphere_quadrature(vmf.log_prob, 300, 600) - 1) < 1e-8, kappa


def test_vmf_log_normalizer_closed_forms_and_reference():
    for kappa in (1e-4, 0.3, 2.5, 30.0, 700.0):
        closed = math.log(kappa) - math.log(4 * math.pi) - (kappa + math.log1p(-math.exp(-2 * kappa)) - math.log(2))
        assert abs(float(vmf_log_normalizer(torch.tensor(kappa, dtype=torch.float64), 3)) - closed) < 1e-12
        two_d = (
            -math.log(2 * math.pi)
            - math.log(float(torch.special.i0e(torch.tensor(kappa, dtype=torch.float64))))
            - kappa
        )
        assert abs(float(vmf_log_normalizer(torch.tensor(kappa, dtype=torch.float64), 2)) - two_d) < 1e-12
    for d in (2, 3, 5, 10):  # kappa = 0 is the uniform law
        assert abs(float(vmf_log_normalizer(torch.tensor(0.0, dtype=torch.float64), d)) + log_sphere_area(d)) < 1e-12
    special = pytest.importorskip("scipy.special")
    for d in (4, 5, 7, 16):
        for kappa in (1e-3, 1.0, 12.0, 150.0, 5000.0):
            nu = d / 2 - 1
            ref = nu * math.log(kappa) - d / 2 * math.log(2 * math.pi) - math.log(special.ive(nu, kappa)) - kappa
            got = float(vmf_log_normalizer(torch.tensor(kappa, dtype=torch.float64), d))
            assert abs(got - ref) < 1e-10 * max(1.0, abs(ref)), (d, kappa)
            ratio = special.ive(d / 2, kappa) / special.ive(nu, kappa)
            assert abs(float(mean_resultant_length(kappa, d)) - ratio) < 1e-12, (d, kappa)


def test_vmf_log_normalizer_gradient():
    kappa = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    for d in (3, 6):
        (grad,) = torch.autograd.grad(vmf_log_normalizer(kappa, d), kappa)
        eps = 1e-6
        fd = (
            float(vmf_log_normalizer(kappa.detach() + eps, d)) - float(vmf_log_normalizer(kappa.detach() - eps, d))
        ) / (2 * eps)
        assert abs(float(grad) - fd) < 1e-7
        assert abs(float(grad) + float(mean_resultant_length(3.0, d))) < 1e-12


@pytest.mark.parametrize("d,kappa", [(3, 2.0), (3, 50.0), (5, 0.7), (2, 5.0)])
def test_vmf_sampler_mean_resultant_length(d, kappa):
    g = torch.Generator().manual_seed(11)
    mu = sphere_points(1, d, seed=4)[0]
    n = 20000
    x = sample_vmf(mu, kappa, n, generator=g)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-12, rtol=0)
    t = x @ mu
    se = float(t.std()) / math.sqrt(n)
    assert abs(float(t.mean()) - float(mean_resultant_length(kappa, d))) < 3 * se
    # the component orthogonal to mu averages to zero (rotational symmetry about mu)
    perp = x - t[:, None] * mu
    assert float(perp.mean(0).norm()) < 3 * math.sqrt(float(perp.pow(2).sum(1).mean()) / n)


def test_base_sampling_temperature():
    vmf = VonMisesFisher(3, mu=[0.0, 1.0, 0.0], kappa=4.0)
    torch.testing.assert_close(vmf.sample(5, temperature=0.0), vmf.mu.detach().expand(5, -1))
    torch.manual_seed(0)
    hot, cold = vmf.sample(20000, temperature=2.0), vmf.sample(20000, temperature=0.5)
    assert abs(float((hot @ vmf.mu).mean()) - float(mean_resultant_length(1.0, 3))) < 0.015  # kappa / T^2 = 1
    assert abs(float((cold @ vmf.mu).mean()) - float(mean_resultant_length(16.0, 3))) < 0.005
    with pytest.raises(ConfigError, match="temperature"):
        vmf.sample(3, temperature=-1.0)
    with pytest.raises(ConfigError, match="temperature"):
        UniformSphere(3).sample(3, temperature=0.0)
    dirichlet = Dirichlet(3, [1.0, 2.0, 3.0])
    torch.testing.assert_close(dirichlet.sample(2, temperature=0.0), torch.tensor([[1 / 6, 2 / 6, 3 / 6]] * 2))


def test_dirichlet_density_against_torch_and_quadrature():
    dist = Dirichlet(3, [2.0, 3.0, 1.0]).double()
    p = simplex_points(7, 3)
    ref = torch.distributions.Dirichlet(dist.concentration.detach()).log_prob(p) - 0.5 * math.log(3)
    torch.testing.assert_close(dist.log_prob(p), ref, atol=1e-12, rtol=0)
    assert abs(simplex_quadrature(dist.log_prob) - 1) < 1e-10
    s = Dirichlet(4, 2.0).sample(10)
    assert (s > 0).all() and torch.allclose(s.sum(1), torch.ones(10))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("kind", list(SPHERE_LAYERS))
def test_sphere_flow_density_integrates_to_one(kind):
    flow = SphereFlow([3], num_layers=3, kind=kind, manifold="sphere", kappa=2.0, init_scale=0.3).double()
    assert not flow.is_image
    assert abs(sphere_quadrature(flow.log_prob) - 1) < 1e-8


@pytest.mark.parametrize("kind", list(SIMPLEX_LAYERS))
def test_simplex_flow_density_integrates_to_one(kind):
    flow = SimplexFlow([3], kind=kind, manifold="simplex", concentration=[2.0, 1.0, 3.0], init_scale=0.0).double()
    layer = flow.transform.transforms[0]
    with torch.no_grad():  # scales >= 1 keep the density bounded at the edges (smooth for quadrature)
        if kind == "calibration":
            layer.log_a.fill_(math.log(2.0))
            layer.b_free.copy_(torch.tensor([0.3, -0.5]))
        else:
            layer.log_ratio_map.lower.fill_(0.4)
            layer.log_ratio_map.log_diag.copy_(torch.tensor([0.7, 0.9]))
            layer.b_free.copy_(torch.tensor([0.3, -0.5]))
    assert abs(simplex_quadrature(flow.log_prob, 300) - 1) < 1e-8


def test_training_on_vmf_mixture_beats_the_uniform_density():
    torch.manual_seed(0)
    dm = VMFMixtureDataModule(num_components=2, kappa=10.0, n_train=2000, n_val=10, n_test=1000)
    dm.setup()
    x, x_test = dm.splits["train"].tensors[0], dm.splits["test"].tensors[0]
    flow = SphereFlow([3], num_layers=4, kind="affine", manifold="sphere")
    uniform = -log_sphere_area(3)
    with torch.no_grad():
        before = float(flow.log_prob(x_test).mean())
    opt = torch.optim.Adam(flow.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        batch = x[torch.randint(0, len(x), (256,), generator=g)]
        loss = -flow.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(flow.log_prob(x_test).mean())
    truth = float(dm.log_density(x_test).mean())
    assert after > uniform + 0.8 and after > before + 0.8
    assert after < truth + 0.05  # no better than the true density (up to test-set noise)


def test_simplex_training_improves_on_the_base():
    torch.manual_seed(0)
    dm = DirichletMixtureDataModule(num_components=1, n_train=1000, n_val=10, n_test=500)
    dm.setup()
    x, x_test = dm.splits["train"].tensors[0], dm.splits["test"].tensors[0]
    flow = SimplexFlow([3], kind="generalized", manifold="simplex")
    opt = torch.optim.Adam(flow.parameters(), lr=3e-2)
    for _ in range(150):
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(flow.log_prob(x_test).mean())
    truth = float(dm.log_density(x_test).mean())
    assert after > truth - 0.1  # one Dirichlet is inside the model family


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "model,dataset,needle",
    [
        ("sphere", "toy2d", "dataset=vmf_sphere"),
        ("sphere", "digits", "dataset=vmf_sphere"),
        ("sphere", "dirichlet_simplex", "manifold: simplex"),
        ("simplex", "vmf_sphere", "dataset=dirichlet_simplex"),
    ],
)
def test_model_refuses_a_dataset_off_its_manifold(model, dataset, needle):
    cfg = compose([f"model={model}", f"dataset={dataset}"])
    with pytest.raises(ConfigError, match="models data on the") as info:
        instantiate_model(cfg)
    assert needle in str(info.value)


def test_bad_model_options_are_clear_errors():
    with pytest.raises(ConfigError, match="translation, linear, affine"):
        SphereFlow([3], kind="rotation", manifold="sphere")
    with pytest.raises(ConfigError, match="vmf, uniform"):
        SphereFlow([3], base="normal", manifold="sphere")
    with pytest.raises(ConfigError, match="calibration, generalized"):
        SimplexFlow([3], kind="dirichlet", manifold="simplex")
    with pytest.raises(ConfigError, match="dirichlet"):
        SimplexFlow([3], base="uniform", manifold="simplex")
    with pytest.raises(ConfigError, match="shape"):
        SphereFlow([1], manifold="sphere")
    with pytest.raises(ConfigError, match="num_layers"):
        SphereFlow([3], num_layers=0, manifold="sphere")
    with pytest.raises(ConfigError, match="kappa"):
        VonMisesFisher(3, kappa=-1.0)


def test_batches_off_the_manifold_are_data_errors():
    sphere = SphereFlow([3], manifold="sphere")
    x = sphere_points(4, 3).float()
    sphere.log_prob(x + 1e-6)  # float32 round-off is fine
    with pytest.raises(DataError, match="off the unit sphere"):
        sphere.log_prob(x * 1.01)
    with pytest.raises(DataError, match="shape"):
        sphere.check_input(torch.randn(4, 2))
    simplex = SimplexFlow([3], manifold="simplex")
    with pytest.raises(DataError, match="non-positive"):
        simplex.log_prob(torch.tensor([[0.5, 0.5, 0.0]]))
    with pytest.raises(DataError, match="sum to 1"):
        simplex.log_prob(torch.tensor([[0.5, 0.5, 0.5]]))


def test_data_modules_check_their_manifold():
    class OffSphere(VMFMixtureDataModule):
        def load_splits(self):
            splits = super().load_splits()
            x, _ = splits["val"]
            x[3] *= 1.1
            return splits

    dm = OffSphere(n_train=20, n_val=10, n_test=10)
    with pytest.raises(DataError, match="val split has 1 points off the unit sphere"):
        dm.setup()

    class ZeroEntry(DirichletMixtureDataModule):
        def load_splits(self):
            splits = super().load_splits()
            splits["test"][0][0] = torch.tensor([0.0, 0.5, 0.5])
            return splits

    with pytest.raises(DataError, match="non-positive"):
        ZeroEntry(n_train=20, n_val=10, n_test=10).setup()
    with pytest.raises(ConfigError, match="manifold"):
        VMFMixtureDataModule(manifold="simplex")
    good = VMFMixtureDataModule(n_train=30, n_val=10, n_test=10, seed=2)
    good.setup()
    assert good.manifold == "sphere" and good.splits["train"].tensors[0].shape == (30, 3)
    again = VMFMixtureDataModule(n_train=30, n_val=10, n_test=10, seed=2)
    again.setup()
    torch.testing.assert_close(again.splits["train"].tensors[0], good.splits["train"].tensors[0], atol=0, rtol=0)
    assert not torch.equal(good.splits["val"].tensors[0], good.splits["test"].tensors[0])


# ----------------------------------------------------------------------------- Hydra, Lightning, figures
@pytest.mark.parametrize(
    "model,dataset,extra",
    [
        ("sphere", "vmf_sphere", []),
        ("sphere", "vmf_sphere", ["dataset.shape=[2]", "model.kind=translation", "model.base=uniform"]),
        ("simplex", "dirichlet_simplex", []),
    ],
)
def test_train_config_runs_and_draws_the_figure(model, dataset, extra, tmp_path):
    import hydra

    cfg = compose(
        [
            f"model={model}",
            f"dataset={dataset}",
            "model.num_layers=2",
            "dataset.batch_size=8",
            "trainer.max_epochs=1",
            *extra,
        ]
    )
    assert cfg.model.manifold == cfg.dataset.manifold
    flow = instantiate_model(cfg)
    assert not flow.is_image
    dm = hydra.utils.instantiate(cfg.dataset, n_train=32, n_val=16, n_test=16)
    trainer, module = fast_dev_run(flow, dm, tmp_path)
    assert torch.isfinite(trainer.callback_metrics["test/loss"])
    path = SampleFigures(str(tmp_path / "figures")).draw(trainer, module, "test")
    assert path is not None and path.exists() and path.stat().st_size > 1000


def test_no_figure_for_other_dimensions(tmp_path):
    flow = SphereFlow([4], num_layers=1, manifold="sphere")
    data = sphere_points(10, 4).float()
    assert manifold_figure(flow, "sphere", 4, data, tmp_path / "s3.png") is None
    assert not (tmp_path / "s3.png").exists()
