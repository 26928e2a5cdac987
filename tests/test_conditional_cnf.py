"""Conditional CNF (FFJORD with a velocity v(x, t, h)): the velocity networks' context input, an unconditional
model's modules unchanged, the adjoint's gradients for the context path (the context network's parameters and the
raw context itself) against backpropagation through the solver and finite differences, and the objectives that do
not train conditional models.  (The generic suite, tests/test_conditional_models.py, checks the log-det, the
density's normalisation and the context errors of every conditional family, cnf included.)"""

import pytest
import torch
from conftest import EXACT_OVERRIDES, SMALL, compose, instantiate_model

from flowforge.errors import ConfigError
from flowforge.flows.cnf import CNF
from flowforge.flows.ffjord import FFJORD
from flowforge.nn.velocity import VelocityConvNet, VelocityMLP
from flowforge.training.objectives.base import MaximumLikelihood
from flowforge.training.objectives.flow_matching import FlowMatching

F64 = torch.float64


def test_velocity_mlp_reads_the_context_at_its_first_layer_only():
    plain = VelocityMLP(3, (8, 5), "tanh")
    assert [tuple(layer.weight.shape) for layer in plain.layers] == [(8, 4), (5, 9), (3, 6)]
    cond = VelocityMLP(3, (8, 5), "tanh", context_features=2).double()
    assert [tuple(layer.weight.shape) for layer in cond.layers] == [(8, 6), (5, 9), (3, 6)]
    x, t = torch.randn(4, 3, dtype=F64), torch.tensor(0.3, dtype=F64)
    h = torch.randn(4, 2, dtype=F64)
    # v(x, t, h) is the plain MLP on [x; t; h]: the first layer's weights split into the x, t and h columns
    w0, b0 = cond.layers[0].weight, cond.layers[0].bias
    first = torch.tanh(x @ w0[:, :3].T + 0.3 * w0[:, 3] + h @ w0[:, 4:].T + b0)
    second = torch.tanh(torch.cat([first, t.expand(4, 1)], 1) @ cond.layers[1].weight.T + cond.layers[1].bias)
    expected = torch.cat([second, t.expand(4, 1)], 1) @ cond.layers[2].weight.T + cond.layers[2].bias
    torch.testing.assert_close(cond(t, x, h), expected, atol=1e-12, rtol=0)
    assert float((cond(t, x, h) - cond(t, x, h.flip(0))).detach().abs().max()) > 1e-3


def test_velocity_convnet_broadcasts_the_context_as_channels():
    plain = VelocityConvNet(2, 4, (3, 3), "softplus")
    assert [tuple(layer.weight.shape) for layer in plain.layers] == [(4, 3, 3, 3), (2, 5, 3, 3)]
    cond = VelocityConvNet(2, 4, (3, 3), "softplus", context_features=3).double()
    assert [tuple(layer.weight.shape) for layer in cond.layers] == [(4, 6, 3, 3), (2, 5, 3, 3)]
    x, t, h = torch.randn(2, 2, 4, 4, dtype=F64), torch.tensor(0.5, dtype=F64), torch.randn(2, 3, dtype=F64)
    # the context channels are constant maps: the same output as feeding them as explicit constant images
    explicit = torch.cat([x, torch.full((2, 1, 4, 4), 0.5, dtype=F64), h[:, :, None, None].expand(2, 3, 4, 4)], 1)
    first = torch.nn.functional.softplus(cond.layers[0](explicit))
    expected = cond.layers[1](torch.cat([first, torch.full((2, 1, 4, 4), 0.5, dtype=F64)], 1))
    torch.testing.assert_close(cond(t, x, h), expected, atol=1e-12, rtol=0)


def _param_count(dim, hidden, blocks):
    sizes = [dim, *hidden, dim]
    return blocks * (sum((a + 1) * b + b for a, b in zip(sizes[:-1], sizes[1:])) + 1)  # + learned T per block


def test_unconditional_ffjord_builds_the_same_modules():
    flow = FFJORD((2,), estimator={"name": "exact"}, num_blocks=2, hidden=(8, 8))
    assert not flow.conditional and flow.context is None
    assert sum(p.numel() for p in flow.parameters()) == _param_count(2, (8, 8), 2)
    cond = FFJORD((2,), estimator={"name": "exact"}, num_blocks=2, hidden=(8, 8), context={"features": 3})
    # the context adds 3 input columns to each block's first layer and nothing else
    assert sum(p.numel() for p in cond.parameters()) == _param_count(2, (8, 8), 2) + 2 * 3 * 8


def _model(adjoint, context_net="null", estimator="exact"):
    overrides = [*SMALL["cnf"], *EXACT_OVERRIDES["cnf"], f"estimator={estimator}", "model.num_blocks=1"]
    overrides += ["model.hidden=[8,8]"]
    overrides += [f"model.adjoint={str(adjoint).lower()}", "model.adjoint_atol=1e-12", "model.adjoint_rtol=1e-12"]
    overrides += ["model.atol=1e-12", "model.rtol=1e-12", "model.context={features:2}"]
    cfg = compose(["model=cnf", "dataset=toy2d", *overrides, f"model.context_net={context_net}"])
    return instantiate_model(cfg).double()


@pytest.mark.parametrize(
    "context_net,estimator",
    [
        ("null", "exact"),
        ("{name:mlp,hidden:[6],features:3}", "exact"),
        ("{name:mlp,hidden:[6],features:3}", "hutchinson"),
    ],
    ids=["raw-exact", "mlp-exact", "mlp-hutchinson"],
)
def test_adjoint_gets_the_context_gradients(context_net, estimator):
    """-sum log p(x | c): the adjoint's gradients for every parameter (context network included) and for the raw
    context c equal backpropagation through the solver; the gradient in c matches a central difference (the same
    Hutchinson probes in every solve: the seed is reset before each)."""
    torch.manual_seed(0)
    direct = _model(False, context_net, estimator)
    adjoint = _model(True, context_net, estimator)
    adjoint.load_state_dict(direct.state_dict())
    x = torch.randn(3, 2, dtype=F64)
    c0 = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.7, 0.9]], dtype=F64)
    grads = []
    for flow in (direct, adjoint):
        c = c0.clone().requires_grad_(True)
        torch.manual_seed(5)
        (-flow.log_prob(x, c).sum()).backward()
        grads.append([("c", c.grad)] + [(n, p.grad) for n, p in flow.named_parameters()])
    names = [n for n, _ in grads[0]]
    assert context_net == "null" or any(n.startswith("context.") for n in names)
    for (name, g_direct), (_, g_adjoint) in zip(*grads):
        assert g_direct is not None and g_adjoint is not None, name
        assert float(g_direct.abs().max()) > 1e-6, name
        torch.testing.assert_close(g_adjoint, g_direct, atol=1e-7, rtol=1e-6, msg=name)
    # the gradient in c against a central difference of the log-likelihood along a random direction
    d, eps = torch.randn_like(c0), 1e-5

    def nll(c):
        torch.manual_seed(5)
        with torch.no_grad():
            return float(-direct.log_prob(x, c).sum())

    up, down = nll(c0 + eps * d), nll(c0 - eps * d)
    assert abs((up - down) / (2 * eps) - float((grads[0][0][1] * d).sum())) < 1e-6


def test_conditional_image_cnf_with_labels_trains_its_embedding():
    """Class-conditional image CNF (labels embedded, broadcast as channels): the embedding gets the adjoint's
    gradient and a training step changes it."""
    torch.manual_seed(0)
    cfg = compose(
        ["model=cnf", "dataset=digits", *SMALL["cnf"], "model.context={classes:10}"]
        + ["model.context_net={name:embedding,features:2}", "model.adjoint=true"]
    )
    flow = instantiate_model(cfg)
    assert flow.conditional and flow.is_image
    x = torch.randint(0, 17, (4, *flow.data_shape)).float()
    labels = torch.tensor([0, 3, 3, 9])
    objective = MaximumLikelihood().bind(flow)
    loss = objective.loss((x, labels), x)["loss"].mean()
    loss.backward()
    grad = flow.context.net.weight.grad
    assert grad is not None and float(grad[[0, 3, 9]].abs().sum()) > 0
    assert float(grad[[1, 2, 4, 5, 6, 7, 8]].abs().sum()) == 0  # labels absent from the batch get none


def test_flow_matching_refuses_a_conditional_cnf():
    flow = FFJORD((2,), estimator={"name": "exact"}, num_blocks=1, hidden=(8,), context={"features": 2})
    assert isinstance(flow.transform.transforms[0], CNF)
    with pytest.raises(ConfigError, match="does not train conditional models"):
        FlowMatching().bind(flow)
    MaximumLikelihood().bind(flow)  # maximum likelihood does
