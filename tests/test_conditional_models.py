"""Every conditional family p(x | c) (``Family.conditional`` in the registry), built from its config with a context:
log-det with context against a brute-force Jacobian (float64), the inverse, the density integrating to 1 over a
grid for several contexts, clear errors for a wrong or missing context, the context networks and the conditional
base, training on (x, c) batches; and every family that does not condition refusing a context by name."""

import math

import pytest
import torch
import yaml
from conftest import EXACT_OVERRIDES, FAMILIES, LOOPED_JACOBIAN, MODELS, ROOT, SMALL, compose, instantiate_model

from flowforge.errors import ConfigError, DataError
from flowforge.testing import jacobian_matrix
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


def brute_force_logdet(flow, x, c, model):
    """``log |det df(x; c)/dx|`` per example from the full float64 Jacobian, one example (and its context) at a
    time (:func:`flowforge.testing.jacobian_matrix`, with copies unless ``model`` is in ``LOOPED_JACOBIAN``)."""
    copies = model not in LOOPED_JACOBIAN
    out = []
    for xi, ci in zip(x, c):
        fn = lambda v, ci=ci: flow(v, ci.expand(v.shape[0], *ci.shape))[0]  # noqa: E731
        out.append(torch.linalg.slogdet(jacobian_matrix(fn, xi.unsqueeze(0), copies))[1])
    return torch.cat(out)


def grid_integral(flow, c, scale=4.0, n=96):
    """``int p(x | c) dx`` over the whole plane: the midpoint rule on an ``n`` x ``n`` grid in ``u`` after the
    substitution ``x_i = scale * tan(u_i)``, ``dx_i = scale / cos(u_i)^2 du_i``, ``u_i`` in ``(-pi/2, pi/2)``, so mass
    far from the origin (a wide density for some context) is counted too; cells are ``scale * pi / n`` wide at
    the origin."""
    step = math.pi / n
    u = torch.linspace(-math.pi / 2 + step / 2, math.pi / 2 - step / 2, n, dtype=torch.float64)
    xs = torch.cartesian_prod(scale * torch.tan(u), scale * torch.tan(u))
    jac = torch.cartesian_prod(scale / torch.cos(u) ** 2, scale / torch.cos(u) ** 2).prod(1)
    total = 0.0
    for chunk, weight in zip(xs.split(10000), jac.split(10000)):
        total += float((flow.log_prob(chunk, c.expand(chunk.shape[0], -1)).detach().exp() * weight).sum())
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
    torch.testing.assert_close(log_det, brute_force_logdet(flow, x, CONTEXTS, model), atol=ATOL, rtol=0)
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
    torch.testing.assert_close(log_det, brute_force_logdet(flow, x, labels, model), atol=ATOL, rtol=0)
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
    """|integral of p(x | c) over R^2 - 1| < 1e-3 for three contexts whose densities differ (a midpoint rule on
    96 x 96 cells after a tan substitution: its error on these models is below 2.5e-4; one context puts 0.8% of a
    conditional Glow's mass outside [-10, 10]^2, which a finite box would miss)."""
    torch.manual_seed(0)
    flow = build(model, f"model.base={base}")
    flow = settled(flow, torch.randn(8, 2, dtype=torch.float64), CONTEXTS[[0, 1, 2, 0, 1, 2, 0, 1]]).eval()
    for c in CONTEXTS:
        assert abs(grid_integral(flow, c) - 1) < 1e-3, f"context {c.tolist()}"
    probe = torch.randn(16, 2, dtype=torch.float64)
    lp = [flow.log_prob(probe, c.expand(16, -1)).detach() for c in CONTEXTS]
    assert float((lp[1] - lp[0]).abs().max()) > 1e-3 and float((lp[2] - lp[0]).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- sampling path with a context
@pytest.mark.parametrize("model", VECTOR)
def test_rsample_and_log_prob_with_context_matches_log_prob(model):
    """``rsample_and_log_prob(n, c)``: the log-density carried along the sampling path equals ``log_prob`` of the
    samples under the same context (one context broadcast, then one per sample), to 1e-6 in float64; a family whose
    sampling path needs an option (planar: ``model.direction=sampling``) is checked with it too."""
    pathwise = FAMILIES[model].pathwise
    for extra in [[]] + ([[pathwise]] if isinstance(pathwise, str) else []):  # e.g. planar's direction=sampling
        torch.manual_seed(0)
        flow = build(model, "model.base=conditional", *extra)
        flow = settled(flow, torch.randn(3, 2, dtype=torch.float64), CONTEXTS).eval()
        for context, rows in ((CONTEXTS[2], CONTEXTS[2].expand(3, -1)), (CONTEXTS, CONTEXTS)):
            x, log_q = flow.rsample_and_log_prob(3, context=context)
            torch.testing.assert_close(log_q.detach(), flow.log_prob(x.detach(), rows).detach(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- amortised planar and radial layers
def _amortised(layer_cls, scale):
    torch.manual_seed(0)
    layer = layer_cls(2, context_features=3).double()
    with torch.no_grad():
        layer.context_map.weight.normal_(0, scale)  # far from the zero init: the context dominates the parameters
    return layer


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_amortised_layers_stay_invertible_for_every_context(name):
    """Planar ``u_hat(h)`` (so ``w(h)^T u_hat(h) >= -1``) and radial ``beta(h) > -alpha(h)`` are built per example:
    with a context map of scale 0.5, where the raw ``w(h)^T u(h)`` reaches -10 (not invertible), every example's map
    stays invertible, its log-det is the float64 Jacobian's (atol 1e-8) and its inverse round-trips (atol 1e-8).
    (For much larger ``w(h)^T u(h)`` the softplus saturates and ``1 + w^T u_hat`` rounds to 0 in float64.)"""
    from flowforge.flows.planar import Planar
    from flowforge.flows.radial import Radial

    layer = _amortised(Planar if name == "planar" else Radial, 0.5)
    h = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if name == "planar":
        u, w, _ = layer.amortised(h)
        assert float(((u * w).sum(1) + 1).detach().min()) > 0
        du, dw, _ = layer.context_map(h).split([2, 2, 1], dim=1)
        assert (
            float(((layer.u + du) * (layer.w + dw)).sum(1).detach().min()) < -1
        )  # the raw u(h) would not be invertible
    else:
        _, alpha, beta = layer._params(h)
        assert float((beta + alpha).detach().min()) > 0
    z, log_det = layer(x, h)
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v, hi=hi: layer(v[None], hi[None])[0][0], xi)
            for xi, hi in zip(x, h)
        ]
    )
    torch.testing.assert_close(log_det.detach(), torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=0)
    assert bool((torch.linalg.det(jac) > 0).all())
    torch.testing.assert_close(layer.inverse(z.detach(), h), x, atol=1e-8, rtol=0)


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
