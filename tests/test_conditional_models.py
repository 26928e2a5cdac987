"""Every conditional family p(x | c) (``Family.conditional`` in the registry), built from its config with a context:
log-det with context against a brute-force Jacobian (float64), the inverse, the density integrating to 1 over a
grid for several contexts, clear errors for a wrong or missing context, the context networks and the conditional
base, training on (x, c) batches; and every family that does not condition refusing a context by name."""

import math

import pytest
import torch
import yaml
from conftest import EXACT_OVERRIDES, FAMILIES, MODELS, ROOT, SMALL, compose, instantiate_model

from flowforge.errors import ConfigError, DataError
from flowforge.training.objectives.base import MaximumLikelihood

CONDITIONAL = [m for m in MODELS if FAMILIES[m].conditional]
VECTOR = [m for m in CONDITIONAL if "vector" in FAMILIES[m].data]
IMAGE = [m for m in CONDITIONAL if FAMILIES[m].images]
UNCONDITIONAL = [m for m in MODELS if not FAMILIES[m].conditional]

VECTOR_CONTEXT = "model.context={features:2}"
LABEL_CONTEXT = "model.context={classes:3}"
# three contexts far enough apart that a context-dependent density differs visibly between them
CONTEXTS = torch.tensor([[0.0, 0.0], [2.5, -1.5], [-2.0, 3.0]], dtype=torch.float64)
ATOL = 1e-6


def build(model, *overrides, dataset="toy2d", context=VECTOR_CONTEXT, exact=True):
    extra = EXACT_OVERRIDES.get(model, []) if exact else []
    cfg = compose([f"model={model}", f"dataset={dataset}", *SMALL[model], *extra, context, *overrides])
    return instantiate_model(cfg).double()


def settled(flow, x, c, scale=0.05):
    """Initialise data-dependent layers on (x, c), then move every parameter off its init (zero-initialised context
    maps included, so the context matters)."""
    flow(x, c)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


def brute_force_logdet(flow, x, c):
    """``log |det df(x; c)/dx|`` per example from the full float64 Jacobian, one example (and its context) at a
    time."""
    out = []
    for xi, ci in zip(x, c):

        def f(v, xi=xi, ci=ci):
            return flow(v.reshape(1, *xi.shape), ci.unsqueeze(0))[0].reshape(-1)

        out.append(torch.linalg.slogdet(torch.autograd.functional.jacobian(f, xi.reshape(-1)))[1])
    return torch.stack(out)


def grid_integral(flow, c, half_width=16.0, n=128):
    """Midpoint rule of ``p(x | c)`` over ``[-w, w]^2`` (``n`` x ``n`` cells)."""
    step = 2 * half_width / n
    ticks = torch.linspace(-half_width + step / 2, half_width - step / 2, n, dtype=torch.float64)
    xs = torch.cartesian_prod(ticks, ticks)
    total = 0.0
    for chunk in xs.split(10000):
        total += float(flow.log_prob(chunk, c.expand(chunk.shape[0], -1)).detach().exp().sum())
    return total * step**2


# ----------------------------------------------------------------------------- exactness with a context
@pytest.mark.parametrize("model", VECTOR)
def test_log_det_with_context_is_exact_and_inverts(model):
    torch.manual_seed(0)
    flow = build(model)
    assert flow.conditional
    x = torch.randn(3, 2, dtype=torch.float64)
    flow = settled(flow, x, CONTEXTS)
    z, log_det = flow(x, CONTEXTS)
    torch.testing.assert_close(log_det, brute_force_logdet(flow, x, CONTEXTS), atol=ATOL, rtol=0)
    torch.testing.assert_close(flow.inverse(z, CONTEXTS), x, atol=ATOL, rtol=0)
    # the same x under another context maps elsewhere: the layers read the context
    z_other, _ = flow(x, CONTEXTS.flip(0))
    assert float((z_other - z)[[0, 2]].detach().abs().max()) > 1e-4


@pytest.mark.parametrize("model", IMAGE)
def test_image_log_det_with_class_label_is_exact(model):
    torch.manual_seed(0)
    flow = build(model, dataset="digits", context="model.context={classes:10}")
    x = torch.rand(2, *flow.data_shape, dtype=torch.float64) * 0.98 + 0.01
    labels = torch.tensor([3, 7])
    flow = settled(flow, x, labels)
    z, log_det = flow(x, labels)
    torch.testing.assert_close(log_det, brute_force_logdet(flow, x, labels), atol=ATOL, rtol=0)
    torch.testing.assert_close(flow.inverse(z, labels), x, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- normalisation per context
# every family with the conditional base; the exact-log-det ones also with the standard normal base (so the layers
# alone make the density depend on c).  Estimated-log-det families solve to 1e-10 here (their exact_test overrides),
# so they run one base; that their layers read the context is checked by the log-det test above.
INTEGRAL_CASES = [(m, "conditional") for m in VECTOR] + [
    (m, "normal") for m in VECTOR if FAMILIES[m].log_det == "exact"
]


@pytest.mark.parametrize("model,base", INTEGRAL_CASES, ids=lambda v: str(v))
def test_density_integrates_to_one_for_every_context(model, base):
    """|integral of p(x | c) over [-16, 16]^2 - 1| < 0.003 for three contexts whose densities differ (a midpoint
    rule on 128 x 128 cells: its error on these models is below 5e-4)."""
    torch.manual_seed(0)
    flow = build(model, f"model.base={base}")
    flow = settled(flow, torch.randn(8, 2, dtype=torch.float64), CONTEXTS[[0, 1, 2, 0, 1, 2, 0, 1]]).eval()
    for c in CONTEXTS:
        assert abs(grid_integral(flow, c) - 1) < 0.003, f"context {c.tolist()}"
    probe = torch.randn(16, 2, dtype=torch.float64)
    lp = [flow.log_prob(probe, c.expand(16, -1)).detach() for c in CONTEXTS]
    assert float((lp[1] - lp[0]).abs().max()) > 1e-3 and float((lp[2] - lp[0]).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- clear errors for the raw context
def _raises(fn, exc, *words):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@pytest.mark.parametrize("model", VECTOR)
def test_wrong_or_missing_context_is_a_clear_data_error(model):
    flow = build(model, exact=False)
    x = torch.randn(3, 2, dtype=torch.float64)
    _raises(lambda: flow.log_prob(x), DataError, "conditional", "pass a context")
    _raises(lambda: flow.sample(4), DataError, "conditional", "pass a context")
    _raises(lambda: flow.log_prob(x, torch.zeros(3, 3, dtype=torch.float64)), DataError, "2 numbers", "(3, 3)")
    _raises(lambda: flow.log_prob(x, torch.zeros(2, 2, dtype=torch.float64)), DataError, "2 rows", "3 examples")
    _raises(lambda: flow.log_prob(x, torch.zeros(3, 2, dtype=torch.long)), DataError, "floating point")

    labelled = build(model, context=LABEL_CONTEXT, exact=False)
    _raises(lambda: labelled.log_prob(x, torch.tensor([0.0, 1.0, 2.0])), DataError, "integers", "float")
    _raises(lambda: labelled.log_prob(x, torch.tensor([0, 1, 3])), DataError, "[0, 3)", "[0, 3]")
    _raises(lambda: labelled.log_prob(x, torch.tensor([0, -1, 2])), DataError, "[0, 3)")
    _raises(lambda: labelled.log_prob(x, torch.tensor([[0], [1], [2]])), DataError, "class label", "(3, 1)")
    _raises(lambda: labelled.log_prob(x, torch.tensor([0, 1])), DataError, "2 rows", "3 examples")

    plain = build(model, context="model.context=null", exact=False)
    assert not plain.conditional
    _raises(lambda: plain.log_prob(x, torch.zeros(3, 2, dtype=torch.float64)), DataError, "unconditional")


@pytest.mark.parametrize("model", VECTOR)
def test_context_net_needs_a_context_and_base_conditional_needs_one(model):
    _raises(
        lambda: build(model, "model.context_net={name:mlp,hidden:[8],features:4}", context="model.context=null"),
        ConfigError,
        "context_net",
    )
    _raises(lambda: build(model, "model.base=conditional", context="model.context=null"), ConfigError, "conditional")
    _raises(lambda: build(model, "model.context_net={name:embedding,features:3}"), ConfigError, "embedding", "name=mlp")


# ----------------------------------------------------------------------------- sampling with a context
@pytest.mark.parametrize("model", VECTOR)
def test_sample_one_context_per_sample_or_broadcast(model):
    torch.manual_seed(0)
    flow = build(model, "model.base=conditional")
    flow = settled(flow, torch.randn(3, 2, dtype=torch.float64), CONTEXTS).eval()
    one = flow.sample(5, context=CONTEXTS[1])
    each = flow.sample(3, context=CONTEXTS)
    assert one.shape == (5, 2) and each.shape == (3, 2)
    assert torch.isfinite(one).all() and torch.isfinite(each).all()
    # temperature 0: every sample is f^{-1}(mean of p_Z(. | c); c) for its own context
    cold = flow.sample(3, context=CONTEXTS, temperature=0.0)
    loc, _ = flow.base.params(flow.embed(CONTEXTS, 3))
    torch.testing.assert_close(cold, flow.inverse(loc, CONTEXTS), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- context networks and training
def _conditional_gaussian(n, labels):
    """x | c ~ N(m(c), 0.5^2 I): a mean that moves with the context (a vector, or a label's own mean)."""
    g = torch.Generator().manual_seed(1)
    if labels:
        c = torch.randint(0, 3, (n,), generator=g)
        mean = torch.tensor([[-2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], dtype=torch.float64)[c]
    else:
        c = torch.randn(n, 2, generator=g, dtype=torch.float64)
        mean = 1.5 * c
    return mean + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64), c


NETS = [
    ("vector-mlp", VECTOR_CONTEXT, "model.context_net={name:mlp,hidden:[8],features:4}"),
    ("labels-embedding", LABEL_CONTEXT, "model.context_net={name:embedding,features:3}"),
    ("labels-onehot", LABEL_CONTEXT, "model.context_net=null"),
]


@pytest.mark.parametrize("case", NETS, ids=lambda c: c[0])
@pytest.mark.parametrize("model", VECTOR)
def test_context_net_builds_gets_gradients_and_trains(model, case):
    """Maximum likelihood on (x, c) batches: every parameter of the context network gets a gradient, and 15 Adam
    steps lower -log p(x | c) on the batch."""
    _, context, net = case
    torch.manual_seed(0)
    flow = build(model, net, "model.base=conditional", context=context, exact=False)
    x, c = _conditional_gaussian(64, labels=context == LABEL_CONTEXT)
    flow = settled(flow, x, c)
    if net.endswith("null"):
        assert not list(flow.context.parameters())
    else:
        assert list(flow.context.parameters())
    objective = MaximumLikelihood().bind(flow)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for step in range(16):
        opt.zero_grad()
        loss = objective.loss((x, c), x)["loss"].mean()
        loss.backward()
        if step == 0:
            for name, p in flow.context.named_parameters():
                assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"no gradient for context.{name}"
        losses.append(float(loss.detach()))
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses


# ----------------------------------------------------------------------------- families that do not condition
def _dataset_for(family):
    """A dataset config the family models: its manifold's, else toy2d (or, for a larger min_dim, power)."""
    if family.manifold:
        for path in sorted((ROOT / "conf" / "dataset").glob("*.yaml")):
            if (yaml.safe_load(path.read_text()) or {}).get("manifold") == family.manifold:
                return path.stem
    return "toy2d" if family.min_dim <= 2 else "power"


@pytest.mark.parametrize("model", UNCONDITIONAL)
def test_family_that_does_not_condition_refuses_a_context_by_name(model):
    dataset = _dataset_for(FAMILIES[model])
    for overrides in ([VECTOR_CONTEXT], ["model.context_net={name:mlp,hidden:[8],features:4}"]):
        cfg = compose([f"model={model}", f"dataset={dataset}", *SMALL[model], *overrides])
        with pytest.raises(ConfigError, match=f"model={model} does not condition"):
            instantiate_model(cfg)
