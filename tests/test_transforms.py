"""Every transform: log-det vs a brute-force autograd Jacobian (float64, atol 1e-6), inverse round
trip (1e-6), inverse log-det consistency, and the contract's shapes."""

import pytest
import torch

from flowforge.flows.actnorm import ActNorm
from flowforge.flows.autoregressive import MaskedAutoregressive
from flowforge.flows.base import Compose, Inverse
from flowforge.flows.coupling import alternating_mask, channel_mask, checkerboard_mask, make_coupling
from flowforge.flows.elementwise import Additive, Affine
from flowforge.flows.invconv import InvertibleLinearLU
from flowforge.flows.multiscale import FactorOut, Reshape, Squeeze
from flowforge.flows.planar import Planar
from flowforge.flows.preprocessing import Logit
from flowforge.flows.radial import Radial
from flowforge.flows.spline import RationalQuadraticSpline
from flowforge.testing import batch_jacobian_logdet

ATOL = 1e-6


def perturb(module, scale=0.2):
    """Move every parameter away from its (often identity) initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def vec(d=3, n=5):
    return torch.randn(n, d, dtype=torch.float64)


def img(shape=(2, 4, 4), n=3):
    return torch.randn(n, *shape, dtype=torch.float64)


CASES = {
    "planar": (lambda: Planar(3), vec),
    "radial": (lambda: Radial(3), vec),
    "additive_coupling": (lambda: make_coupling(alternating_mask(3, 0), Additive(), [16]), vec),
    "affine_coupling_tanh": (lambda: make_coupling(alternating_mask(3, 1), Affine("tanh"), [16]), vec),
    "affine_coupling_sigmoid": (lambda: make_coupling(alternating_mask(4, 0), Affine("sigmoid"), [16]), lambda: vec(4)),
    "affine_coupling_exp": (lambda: make_coupling(alternating_mask(3, 0), Affine("exp"), [16]), vec),
    "spline_coupling": (
        lambda: make_coupling(alternating_mask(3, 0), RationalQuadraticSpline(6, 3.0), [16]),
        lambda: 2 * vec(),
    ),
    "checkerboard_coupling": (lambda: make_coupling(checkerboard_mask((2, 4, 4), 0), Affine(), 8), img),
    "channel_coupling": (lambda: make_coupling(channel_mask((2, 4, 4), 1), Affine(), 8), img),
    "spline_channel_coupling": (
        lambda: make_coupling(channel_mask((2, 4, 4), 0), RationalQuadraticSpline(4, 3.0), 8),
        img,
    ),
    "actnorm_vector": (lambda: ActNorm((3,)), vec),
    "actnorm_image": (lambda: ActNorm((2, 4, 4)), img),
    "lu_linear": (lambda: InvertibleLinearLU((3,)), vec),
    "lu_linear_identity_start": (lambda: InvertibleLinearLU((3,), "identity"), vec),
    "lu_linear_permutation_start": (lambda: InvertibleLinearLU((4,), "permutation"), lambda: vec(4)),
    "coupling_irregular_mask": (
        lambda: make_coupling(torch.tensor([True, False, False, True, True]), Affine(), [8]),
        lambda: vec(5),
    ),
    "lu_1x1_conv": (lambda: InvertibleLinearLU((2, 4, 4)), img),
    "maf_affine": (lambda: MaskedAutoregressive(4, Affine(), [16, 16], order=[2, 0, 3, 1]), lambda: vec(4)),
    "maf_spline": (lambda: MaskedAutoregressive(3, RationalQuadraticSpline(5, 3.0), [16]), lambda: 2 * vec()),
    "iaf_affine": (lambda: Inverse(MaskedAutoregressive(3, Affine(), [16])), vec),
    "maf_1d": (lambda: MaskedAutoregressive(1, Affine(), [8]), lambda: vec(1)),
    "logit": (lambda: Logit(0.05), lambda: torch.rand(4, 3, dtype=torch.float64)),
    "squeeze": (lambda: Squeeze(), img),
    "reshape": (lambda: Reshape((2, 4, 4), (32,)), img),
    "factor_out": (
        lambda: FactorOut(Compose([Reshape((1, 4, 4), (16,)), InvertibleLinearLU((16,))]), (2, 4, 4)),
        img,
    ),
    "compose": (lambda: Compose([Planar(3), make_coupling(alternating_mask(3, 0), Affine(), [8]), ActNorm((3,))]), vec),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    make, data = CASES[request.param]
    t = make().double()
    x = data()
    t(x)  # data-dependent initialisation (ActNorm) on the batch, before perturbing
    return perturb(t), x


def test_log_det_matches_brute_force_jacobian(case):
    t, x = case
    z, log_det = t(x)
    assert log_det.shape == (x.shape[0],)
    ref = batch_jacobian_logdet(t, x)
    torch.testing.assert_close(log_det, ref, atol=ATOL, rtol=0)


def test_inverse_round_trip(case):
    t, x = case
    z, _ = t(x)
    torch.testing.assert_close(t.inverse(z), x, atol=ATOL, rtol=0)


def test_inverse_log_det_is_negated_forward(case):
    t, x = case
    z, log_det = t(x)
    x_back, inv_log_det = t.inverse_and_log_det(z)
    torch.testing.assert_close(x_back, x, atol=ATOL, rtol=0)
    torch.testing.assert_close(inv_log_det, -log_det, atol=ATOL, rtol=0)


def test_spline_outside_bound_is_identity_and_identity_at_zero_params():
    sp = RationalQuadraticSpline(bins=5, bound=2.0)
    x = torch.tensor([-5.0, -2.5, 3.0, 10.0], dtype=torch.float64)
    p = torch.randn(4, sp.num_params, dtype=torch.float64)
    y, ladj = sp.forward(x, p)
    torch.testing.assert_close(y, x)
    assert torch.all(ladj == 0)
    x_in = torch.linspace(-1.9, 1.9, 11, dtype=torch.float64)
    y0, l0 = sp.forward(x_in, torch.zeros(11, sp.num_params, dtype=torch.float64))
    torch.testing.assert_close(y0, x_in, atol=1e-12, rtol=0)
    torch.testing.assert_close(l0, torch.zeros_like(l0), atol=1e-12, rtol=0)


def test_spline_large_parameters_still_invert():
    sp = RationalQuadraticSpline(bins=8, bound=3.0)
    x = torch.linspace(-2.99, 2.99, 200, dtype=torch.float64)
    p = 4 * torch.randn(200, sp.num_params, dtype=torch.float64)
    y, ladj = sp.forward(x, p)
    xr, iladj = sp.inverse(y, p)
    torch.testing.assert_close(xr, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(iladj, -ladj, atol=1e-8, rtol=0)
    assert torch.all(y[1:] >= -3) and torch.all(y <= 3)


def test_made_is_autoregressive():
    made = MaskedAutoregressive(5, Affine(), [32, 32], order=[3, 1, 4, 0, 2]).double()
    perturb(made)
    x = torch.randn(1, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: made(v)[0], x)[0, :, 0, :]
    order = [3, 1, 4, 0, 2]  # variable i is at position order[i]
    for i in range(5):
        for j in range(5):
            if order[j] > order[i]:
                assert jac[i, j] == 0, (i, j)


def test_actnorm_initialises_to_zero_mean_unit_variance():
    x = 3 + 2 * torch.randn(4096, 3, 2, 2)
    an = ActNorm((3, 2, 2))
    z, _ = an(x)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    assert an.initialized.item() == 1.0
    before = an.loc.detach().clone()
    an(x + 10)
    torch.testing.assert_close(an.loc.detach(), before)  # initialised once only


def test_planar_keeps_invertibility_constraint():
    p = Planar(2)
    with torch.no_grad():
        p.w.copy_(torch.tensor([1.0, 0.0]))
        p.u.copy_(torch.tensor([-5.0, 0.0]))  # w.u = -5 would be non-invertible without u_hat
    assert float(p.u_hat() @ p.w) > -1


@pytest.mark.parametrize("init", ["orthogonal", "permutation", "identity"])
def test_lu_initial_weight(init):
    w = InvertibleLinearLU((6,), init).weight().detach()
    torch.testing.assert_close(w @ w.T, torch.eye(6), atol=1e-5, rtol=0)  # all three start orthogonal
    if init != "orthogonal":
        assert set(w.unique().tolist()) == {0.0, 1.0}  # a permutation matrix
    if init == "identity":
        torch.testing.assert_close(w, torch.eye(6))


def test_lu_unknown_init_is_a_config_error():
    from flowforge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown LU initialisation 'rotation'; choose one of orthogonal"):
        InvertibleLinearLU((3,), "rotation")


@pytest.mark.parametrize(
    "mask,kept,transformed",
    [(alternating_mask(7, 0), 4, 3), (alternating_mask(64, 1), 32, 32), (channel_mask((4, 2, 2), 1), 2, 2)],
)
def test_coupling_conditioner_reads_kept_and_emits_transformed_features_only(mask, kept, transformed):
    spline = RationalQuadraticSpline(4, 3.0)
    c = make_coupling(mask, spline, [16] if mask.dim() == 1 else 8)
    layers = [m for m in c.conditioner.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    first, last = layers[0], layers[-1]
    n_in = first.in_features if isinstance(first, torch.nn.Linear) else first.in_channels
    n_out = last.out_features if isinstance(last, torch.nn.Linear) else last.out_channels
    assert (n_in, n_out) == (kept, transformed * spline.num_params)


def test_checkerboard_coupling_conditioner_sees_the_whole_masked_image():
    c = make_coupling(checkerboard_mask((2, 4, 4), 0), Affine(), 8)
    assert c.split is None
    assert (c.conditioner.net[0].in_channels, c.conditioner.net[-1].out_channels) == (2, 4)


def test_coupling_mask_that_keeps_everything_is_a_config_error():
    from flowforge.errors import ConfigError

    with pytest.raises(ConfigError, match="must keep some and transform some features"):
        make_coupling(torch.ones(4, dtype=torch.bool), Affine(), [8])


@pytest.mark.parametrize("learn", [False, True])
def test_base_log_prob_matches_torch_distributions(learn):
    from flowforge.flows.distributions import DiagonalGaussian, StandardNormal

    base = (DiagonalGaussian((3, 2)) if learn else StandardNormal((3, 2))).double()
    if learn:
        perturb(base, 1.0)
    z = torch.randn(7, 3, 2, dtype=torch.float64)
    ref = torch.distributions.Normal(base.loc, base.log_scale.exp()).log_prob(z).sum((1, 2))
    torch.testing.assert_close(base.log_prob(z), ref, atol=1e-12, rtol=0)
