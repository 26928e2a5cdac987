"""Every conf/model/*.yaml, composed through Hydra and instantiated for a vector and an image dataset:
exact log-likelihood (brute-force Jacobian, float64), round trip, sampling, save/load, train/eval."""

import io
import math

import pytest
import torch
from conftest import EXACT_OVERRIDES, FAMILIES, LOOPED_JACOBIAN, MODELS, SMALL, compose, instantiate_model

from flowforge.testing import batch_jacobian_logdet

ATOL = 1e-6


def build(model, dataset):
    extra = EXACT_OVERRIDES.get(model, [])
    cfg = compose([f"model={model}", f"dataset={dataset}", *SMALL[model], *extra])
    return instantiate_model(cfg).double()


def inputs(flow, n=3):
    if flow.is_image:
        return torch.rand(n, *flow.data_shape, dtype=torch.float64) * 0.98 + 0.01
    return torch.randn(n, *flow.data_shape, dtype=torch.float64)


def settled(flow, x):
    """Initialise data-dependent layers on x, then move all parameters off their identity init."""
    flow(x)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


# manifold models (sphere, simplex) are checked against the tangent-space volume formula in test_manifold_flows
CASES = [(m, "toy2d") for m in MODELS if not FAMILIES[m].manifold] + [
    (m, "digits") for m in MODELS if FAMILIES[m].images
]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def model_and_x(request):
    model, dataset = request.param
    flow = build(model, dataset)
    x = inputs(flow)
    return settled(flow, x), x


def test_log_prob_is_exact_change_of_variables(model_and_x, request):
    flow, x = model_and_x
    model = request.node.callspec.params["model_and_x"][0]
    z, log_det = flow(x)
    ref = batch_jacobian_logdet(flow, x, copies=model not in LOOPED_JACOBIAN)
    torch.testing.assert_close(log_det, ref, atol=ATOL, rtol=0)
    expected = -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + ref
    torch.testing.assert_close(flow.log_prob(x), expected, atol=ATOL, rtol=0)


def test_inverse_round_trip(model_and_x):
    flow, x = model_and_x
    z, _ = flow(x)
    torch.testing.assert_close(flow.inverse(z), x, atol=ATOL, rtol=0)


def test_sample_shape_and_temperature(model_and_x):
    flow, x = model_and_x
    s = flow.sample(7)
    assert s.shape == (7, *flow.data_shape) and torch.isfinite(s).all()
    cold = flow.sample(4, temperature=0.0)  # all draws collapse onto f^{-1}(mean of p_Z)
    torch.testing.assert_close(cold, flow.inverse(flow.base.loc.expand(4, -1)), atol=1e-9, rtol=0)
    torch.manual_seed(1)
    z1 = flow.base.sample(2000, temperature=0.5)
    assert abs(float(z1.std()) - 0.5) < 0.03


@pytest.mark.parametrize("model,dataset", CASES, ids=lambda v: str(v))
def test_state_dict_save_load_round_trip(model, dataset):
    torch.manual_seed(0)
    a = build(model, dataset)
    x = inputs(a)
    settled(a, x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # a different init for the copy, so loading must do all the work
    b = build(model, dataset)
    b.load_state_dict(torch.load(buf))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, atol=0, rtol=0)
    torch.testing.assert_close(b.log_prob(x), a.log_prob(x), atol=0, rtol=0)


def test_train_and_eval_mode_agree(model_and_x):
    flow, x = model_and_x
    flow.train()
    a = flow.log_prob(x)
    flow.eval()
    torch.testing.assert_close(flow.log_prob(x), a, atol=0, rtol=0)
