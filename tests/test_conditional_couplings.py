"""Conditional coupling and autoregressive families (RealNVP, NICE, Glow, NSF coupling and autoregressive, MAF,
IAF): with a context c, the log-determinant at fixed c equals the float64 brute-force Jacobian of x -> z, the
inverse undoes the forward at the same c, the density depends on c, the context path is trained, sampling takes
one context or one per sample, the conditional base works; an unconditional model builds the same modules as
before the context existed."""

import math

import pytest
import torch

from flowforge.errors import DataError
from flowforge.flows.coupling import ImageConditioner, VectorConditioner
from flowforge.flows.glow import Glow
from flowforge.flows.maf import IAF, MAF
from flowforge.flows.nice import NICE
from flowforge.flows.nsf import NSF
from flowforge.flows.realnvp import RealNVP
from flowforge.nn import MADE

D = 3
IMAGE = (2, 4, 4)
IMAGE_DATA = {"num_levels": 256, "logit_alpha": 0.05}

VECTOR_FAMILIES = {
    "realnvp": lambda shape, **kw: RealNVP(shape, num_steps=2, hidden=[16], channels=8, **kw),
    "nice": lambda shape, **kw: NICE(shape, num_steps=2, hidden=[16], channels=8, **kw),
    "glow": lambda shape, **kw: Glow(shape, num_steps=2, hidden=[16], channels=8, **kw),
    "nsf": lambda shape, **kw: NSF(shape, num_steps=2, hidden=[16], channels=8, bins=4, **kw),
    "nsf_ar": lambda shape, **kw: NSF(shape, num_steps=2, hidden=[16], bins=4, autoregressive=True, **kw),
    "maf": lambda shape, **kw: MAF(shape, num_layers=2, hidden=[16], **kw),
    "iaf": lambda shape, **kw: IAF(shape, num_layers=2, hidden=[16], **kw),
}
IMAGE_FAMILIES = {
    "realnvp": lambda **kw: VECTOR_FAMILIES["realnvp"](IMAGE, num_scales=2, **IMAGE_DATA, **kw),
    "nice": lambda **kw: VECTOR_FAMILIES["nice"](IMAGE, num_scales=2, **IMAGE_DATA, **kw),
    "glow": lambda **kw: VECTOR_FAMILIES["glow"](IMAGE, num_scales=2, **IMAGE_DATA, **kw),
    "nsf": lambda **kw: VECTOR_FAMILIES["nsf"](IMAGE, num_scales=1, **IMAGE_DATA, **kw),
}
# raw context spec, context_net, and a batch of raw contexts
CONTEXTS = {
    "vector": ({"features": 2}, None),
    "label": ({"classes": 4}, None),
    "label_embedding": ({"classes": 4}, {"name": "embedding", "features": 3}),
}


def _contexts(spec: dict, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if "classes" in spec:
        return torch.randint(0, spec["classes"], (n,), generator=g)
    return torch.randn(n, spec["features"], generator=g, dtype=torch.float64)


def _randomized(flow: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """float64, data-dependent inits marked done, and every parameter drawn at random: the zero-initialised last
    layers would otherwise hide the context (a fresh coupling is the identity whatever c is).  ``scale``: the
    standard deviation of the draws (deep image stacks need small ones so that sampling stays finite)."""
    flow = flow.double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in flow.modules():
            if hasattr(m, "mark_initialized"):
                m.mark_initialized()
        for p in flow.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def _brute_log_det(flow, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(x.shape[0]):
        ci = c[i : i + 1]
        J = torch.autograd.functional.jacobian(lambda xi, ci=ci: flow(xi[None], ci)[0][0], x[i])
        out.append(torch.linalg.slogdet(J.reshape(J.shape[0], -1))[1])
    return torch.stack(out)


def _context_weights(flow) -> list[torch.Tensor]:
    """The weights that read the context features in every conditioner, as (parameter, slice) grads."""
    grads = []
    for m in flow.modules():
        if isinstance(m, VectorConditioner):
            first = next(l for l in m.net.modules() if isinstance(l, torch.nn.Linear))
            grads.append(first.weight.grad[:, -flow.context.features :])
        elif isinstance(m, ImageConditioner):
            first = next(l for l in m.net.modules() if isinstance(l, torch.nn.Conv2d))
            grads.append(first.weight.grad[:, -flow.context.features :])
        elif isinstance(m, MADE):
            grads.append(m.context_linear.weight.grad)
    return grads


def _check_conditional(flow, x: torch.Tensor, spec: dict) -> None:
    n = x.shape[0]
    c = _contexts(spec, n, seed=2)
    z, log_det = flow(x, c)
    assert z.shape == (n, math.prod(x.shape[1:]))
    # log-det at fixed c against the brute-force Jacobian in x
    torch.testing.assert_close(log_det, _brute_log_det(flow, x, c), atol=1e-8, rtol=1e-8)
    # the inverse at the same c undoes the forward
    torch.testing.assert_close(flow.inverse(z, c), x, atol=1e-8, rtol=1e-8)
    h = flow.embed(c, n)
    u = x if flow.preprocess is None else flow.preprocess(x)[0]
    z_t, log_det_t = flow.transform(u, h)
    u_back, inv_log_det = flow.transform.inverse_and_log_det(z_t, h)
    torch.testing.assert_close(u_back, u, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(inv_log_det, -log_det_t, atol=1e-8, rtol=1e-8)
    # the density depends on the context
    other = _contexts(spec, n, seed=3)
    if "classes" in spec:
        other = (c + 1) % spec["classes"]
    lp, lp_other = flow.log_prob(x, c), flow.log_prob(x, other)
    assert torch.isfinite(lp).all()
    assert (lp - lp_other).abs().min() > 1e-4
    # the context path receives gradients
    flow.zero_grad()
    (-flow.log_prob(x, c).mean()).backward()
    grads = _context_weights(flow)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    if flow.context.net is not None:
        assert flow.context.net.weight.grad[c].abs().sum() > 0
    # sampling: one context for all samples, or one per sample
    one = c[0]
    assert flow.sample(5, context=one).shape == (5, *flow.data_shape)
    assert flow.sample(5, context=_contexts(spec, 5, seed=4)).shape == (5, *flow.data_shape)
    if "classes" in spec:
        assert flow.sample(5, context=int(one)).shape == (5, *flow.data_shape)
    samples, log_q = flow.rsample_and_log_prob(4, context=one)
    torch.testing.assert_close(log_q, flow.log_prob(samples, one.expand(4, *one.shape)), atol=1e-6, rtol=1e-6)
    with pytest.raises(DataError, match="conditional"):
        flow.log_prob(x)


@pytest.mark.parametrize("ctx", sorted(CONTEXTS))
@pytest.mark.parametrize("name", sorted(VECTOR_FAMILIES))
def test_vector_family_conditions_on_the_context(name, ctx):
    spec, net = CONTEXTS[ctx]
    flow = _randomized(VECTOR_FAMILIES[name]((D,), context=spec, context_net=net))
    assert flow.conditional
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _check_conditional(flow, x, spec)


@pytest.mark.parametrize("name", sorted(IMAGE_FAMILIES))
def test_image_family_conditions_on_a_label(name):
    spec = {"classes": 4}
    flow = _randomized(IMAGE_FAMILIES[name](context=spec, context_net={"name": "embedding", "features": 3}), 0.1)
    x = torch.rand(2, *IMAGE, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.9 + 0.05
    _check_conditional(flow, x, spec)


@pytest.mark.parametrize("name", sorted(VECTOR_FAMILIES))
def test_conditional_base(name):
    """``base=conditional``: log p(x | c) = log N(f(x; h); mu(h), sigma(h)^2) + log |det df/dx|, in closed form."""
    spec = {"features": 2}
    flow = _randomized(VECTOR_FAMILIES[name]((D,), context=spec, base="conditional"))
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c = _contexts(spec, 4, seed=2)
    z, log_det = flow(x, c)
    out = flow.base.net(c)  # context_net null: h = c
    loc, log_scale = out[:, :D], out[:, D:]
    expected = torch.distributions.Normal(loc, log_scale.exp()).log_prob(z).sum(1) + log_det
    torch.testing.assert_close(flow.log_prob(x, c), expected, atol=1e-10, rtol=1e-10)
    assert flow.sample(3, context=c[0]).shape == (3, D)


def test_conditional_made_is_autoregressive_in_x_and_sees_the_context_in_every_output():
    torch.manual_seed(0)
    order = [2, 0, 3, 1]
    made = MADE(4, [16, 16], 2, order=order, zero_last=False, context_features=3).double()
    x, h = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    Jx = torch.autograd.functional.jacobian(lambda v: made(v[None], h[None])[0], x)  # (4, 2, 4)
    Jh = torch.autograd.functional.jacobian(lambda v: made(x[None], v[None])[0], h)  # (4, 2, 3)
    for i in range(4):
        for j in range(4):
            if order[j] >= order[i]:
                assert Jx[i, :, j].abs().max() == 0
            else:
                assert Jx[i, :, j].abs().max() > 0
    assert (Jh.abs().sum(-1) > 0).all()  # the first output in the order too: the context has degree 0
    # the unconditional path of the same MADE is unchanged by the context layer
    torch.testing.assert_close(made(x[None]), made.net(x[None]).view(1, 4, 2))


# parameter counts of the unconditional models measured before the context existed: an unconditional model builds
# exactly the same modules
UNCONDITIONAL_COUNTS = {
    "realnvp": (lambda: VECTOR_FAMILIES["realnvp"]((D,)), 182),
    "nsf_ar": (lambda: VECTOR_FAMILIES["nsf_ar"]((D,)), 1250),
    "maf": (lambda: VECTOR_FAMILIES["maf"]((D,)), 332),
    "glow_image": (lambda: IMAGE_FAMILIES["glow"](), 6976),
    "nice_image": (lambda: IMAGE_FAMILIES["nice"](), 4104),
    "nsf_image": (lambda: IMAGE_FAMILIES["nsf"](), 7464),
}


@pytest.mark.parametrize("name", sorted(UNCONDITIONAL_COUNTS))
def test_unconditional_model_is_unchanged(name):
    build, count = UNCONDITIONAL_COUNTS[name]
    flow = build()
    assert not flow.conditional
    assert sum(p.numel() for p in flow.parameters()) == count
    assert not any(hasattr(m, "context_linear") for m in flow.modules())


def test_the_configs_build_conditional_models():
    """``model.context`` / ``model.context_net`` / ``model.base=conditional`` from the Hydra configs reach every
    family."""
    from conftest import SMALL, compose, instantiate_model

    x, c = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
    for name in sorted({"realnvp", "nice", "glow", "nsf", "maf", "iaf"}):
        overrides = [
            "model.context={classes:3}",
            "model.context_net={name:embedding,features:4}",
            "model.base=conditional",
        ]
        flow = instantiate_model(compose([f"model={name}", "dataset=toy2d", *SMALL[name], *overrides]))
        assert flow.conditional and flow.context.features == 4 and flow.base.conditional
        assert torch.isfinite(flow.log_prob(x, c)).all()
