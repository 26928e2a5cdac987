"""Typed options of the contractive families: each config key sets its field, the typed and the flat form
build the same model, and the recipe defaults (conf/model/*.yaml) agree with the Python defaults except
for the sizes listed in DELIBERATE."""

import inspect
from dataclasses import fields, replace

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from torch import nn

from flowforge.errors import ConfigError
from flowforge.estimators.logdet import LogDetEstimator
from flowforge.flows.impflow import ImplicitBlock, ImplicitFlow
from flowforge.flows.monotone import MONOTONE_G, MonotoneBlock, MonotoneFlow
from flowforge.flows.options import GNet, Lipschitz, Solvers, Stack, as_config, config_keys, g_net, with_config
from flowforge.flows.resflow import INVERSE_TOLERANCES, IResNet, ResidualFlow
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.densenet import dense_convnet, dense_mlp
from flowforge.nn.lipschitz import SpectralNormConv2d, SpectralNormLinear
from flowforge.nn.lipschitz_net import lipschitz_convnet, lipschitz_mlp

EXACT = LogDetEstimator("exact")
FAMILIES = {"resflow": ResidualFlow, "iresnet": IResNet, "impflow": ImplicitFlow, "monotone": MonotoneFlow}
#: keys the YAML gets from the dataset and estimator groups (the context from the dataset), not defaults of the family
WIRED = {"_target_", "shape", "num_levels", "logit_alpha", "estimator", "context", "context_net"}
#: recipe defaults that differ from the Python (paper-size) defaults on purpose: CPU-sized image models,
#: and Residual Flows' toy coefficient (0.98 is the paper's image models')
DELIBERATE = {
    "resflow": {"blocks_per_scale", "channels", "fc_blocks", "fc_hidden", "coeff"},
    "iresnet": {"blocks_per_scale", "channels", "fc_blocks", "fc_hidden"},
    "impflow": {"blocks_per_scale", "channels", "fc_hidden"},
    "monotone": {"blocks_per_scale", "channels", "fc_blocks", "fc_hidden"},
}
SOLVER_KEYS = {"forward_solver", "inverse_solver", "backward_solver", "on_fail", *INVERSE_TOLERANCES}
GROUPS = ("g", "lipschitz", "stack", "solvers")


def recipe(family: str) -> dict:
    """The flat keys of conf/model/<family>.yaml (with the configs it extends)."""
    node = OmegaConf.load(ROOT / "conf" / "model" / f"{family}.yaml")
    parents = [OmegaConf.load(ROOT / "conf" / "model" / f"{p}.yaml") for p in node.pop("defaults", []) if p != "_self_"]
    merged = OmegaConf.to_container(OmegaConf.merge(*parents, node), resolve=False)
    return {k: v for k, v in merged.items() if k not in WIRED}


def python_defaults(family: str) -> dict:
    """The option groups and ``base`` a family uses when given nothing (IResNet: its own g, the rest
    ResidualFlow's)."""
    params = dict(inspect.signature(ResidualFlow).parameters)
    params.update(inspect.signature(FAMILIES[family]).parameters)
    return {name: params[name].default for name in (*GROUPS, "base")}


def block_solvers(family: str, solvers: Solvers, tolerances: dict) -> dict:
    """The solvers a block of ``family`` runs, resolved from ``solvers`` and the block's presets."""
    if family in ("resflow", "iresnet"):
        b = ResidualBlock(
            nn.Identity(),
            inverse_solver=solvers.inverse,
            backward_solver=solvers.backward,
            on_fail=solvers.on_fail,
            **tolerances,
        )
        return {"inverse": b.inverse_solver, "backward": b.backward_solver, "on_fail": b.on_fail}
    specs = dict(forward_solver=solvers.forward, inverse_solver=solvers.inverse, backward_solver=solvers.backward)
    if family == "impflow":
        b = ImplicitBlock(nn.Identity(), nn.Identity(), on_fail=solvers.on_fail, **specs)
        x, z = b.residual_x, b.residual_z
        return {
            "forward": z.inverse_solver,
            "inverse": x.inverse_solver,
            "backward": x.backward_solver,
            "on_fail": x.on_fail,
        }
    b = MonotoneBlock(nn.Identity(), on_fail=solvers.on_fail, **specs)
    return {
        "forward": b.forward_solver,
        "inverse": b.inverse_solver,
        "backward": b.backward_solver,
        "on_fail": b.on_fail,
    }


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recipe_defaults_agree_with_the_python_defaults(family):
    yaml = recipe(family)
    defaults = python_defaults(family)
    python = {**as_config(**{k: defaults[k] for k in GROUPS}), "base": defaults["base"]}
    assert set(yaml) - set(python) - SOLVER_KEYS == set(), "every recipe key names an option"
    compared = set(yaml) - SOLVER_KEYS
    differ = {k for k in compared if _plain(yaml[k]) != _plain(python[k])}
    assert differ == DELIBERATE[family], "only the listed sizes differ (and each listed one does)"
    # solvers: the recipe's specs and the Python defaults resolve to the same solvers in the blocks
    tolerances = {k: yaml[k] for k in INVERSE_TOLERANCES if k in yaml}
    from_yaml = with_config({k: yaml[k] for k in yaml if k in SOLVER_KEYS - set(INVERSE_TOLERANCES)}, solvers=Solvers())
    assert block_solvers(family, from_yaml["solvers"], tolerances) == block_solvers(family, defaults["solvers"], {})


def test_power_iteration_defaults_agree_with_the_layers():
    lip = Lipschitz()
    for builder in (lipschitz_mlp, lipschitz_convnet, dense_mlp, dense_convnet):
        params = inspect.signature(builder).parameters
        assert (params["sn_rtol"].default, params["sn_max_iters"].default) == (lip.rtol, lip.max_iters)
    for layer in (SpectralNormLinear, SpectralNormConv2d):
        params = inspect.signature(layer).parameters
        assert (params["rtol"].default, params["max_iters"].default) == (lip.rtol, lip.max_iters)


def test_each_config_key_sets_its_own_field():
    groups = dict(g=GNet(), lipschitz=Lipschitz(), stack=Stack(), solvers=Solvers())
    keys = config_keys(**groups)
    assert {"g", "fc_g", "sn_rtol", "sn_max_iters", "forward_solver", "inverse_solver", "backward_solver"} <= set(keys)
    assert len(keys) == sum(len(fields(g)) for g in groups.values())
    base = as_config(**groups)
    for key, (group, name) in keys.items():
        value = "dense" if key in ("g", "fc_g") else object()
        changed = with_config({key: value}, **groups)
        assert getattr(changed[group], name) is value or getattr(changed[group], name) == value
        assert as_config(**changed) == {**base, key: value}
    with pytest.raises(TypeError, match="nosuch"):
        with_config({"nosuch": 1}, **groups)


def test_a_kind_name_selects_the_familys_g_of_that_kind():
    assert g_net("mlp", MONOTONE_G) == replace(MONOTONE_G, kind="mlp")
    assert g_net("mlp", MONOTONE_G).act == "cpila"
    custom = GNet(hidden=(4,))
    assert g_net(custom, MONOTONE_G) is custom


def _summary(flow):
    """Everything the options decide: parameters and buffers, the layers' bounds and power-iteration
    settings, the blocks' solvers and failure policy, and the module tree."""
    attrs = {}
    for name, m in flow.named_modules():
        for a in ("coeff", "rtol", "max_iters", "forward_solver", "inverse_solver", "backward_solver", "on_fail"):
            if hasattr(m, a) and not callable(getattr(m, a)):
                attrs[f"{name}.{a}"] = repr(getattr(m, a))
    return {k: v.clone() for k, v in flow.state_dict().items()}, attrs, repr(flow)


def _same(a, b):
    (sd_a, attrs_a, repr_a), (sd_b, attrs_b, repr_b) = a, b
    assert list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert attrs_a == attrs_b and repr_a == repr_b


IMAGE = dict(estimator=EXACT, num_levels=256, logit_alpha=0.05)
TYPED_AND_FLAT = {
    "resflow": (
        lambda: ResidualFlow(
            (1, 8, 8),
            g=GNet(channels=4, fc_hidden=(8,), act="elu", coeff=0.9),
            lipschitz=Lipschitz(rtol=1e-4, max_iters=50),
            stack=Stack(blocks_per_scale=(1,), fc_blocks=1, squeeze_first=True, actnorm=False),
            solvers=Solvers(inverse="anderson", on_fail="raise"),
            **IMAGE,
        ),
        lambda: ResidualFlow(
            (1, 8, 8),
            channels=4,
            fc_hidden=[8],
            act="elu",
            coeff=0.9,
            sn_rtol=1e-4,
            sn_max_iters=50,
            blocks_per_scale=[1],
            fc_blocks=1,
            squeeze_first=True,
            actnorm=False,
            inverse_solver="anderson",
            on_fail="raise",
            **IMAGE,
        ),
    ),
    "iresnet": (
        lambda: IResNet((3,), EXACT, g=GNet(act="elu", coeff=0.9, hidden=(8,)), stack=Stack(num_blocks=2)),
        lambda: IResNet((3,), EXACT, hidden=[8], num_blocks=2),
    ),
    "impflow": (
        lambda: ImplicitFlow(
            (3,),
            EXACT,
            g=GNet(act="sin", coeff=0.99, hidden=(8,)),
            stack=Stack(num_blocks=2, blocks_per_scale=(2, 2, 2), fc_blocks=2),
            solvers=Solvers(forward={"method": "anderson"}, backward={"max_iters": 7}),
        ),
        lambda: ImplicitFlow(
            (3,),
            EXACT,
            hidden=[8],
            num_blocks=2,
            forward_solver={"method": "anderson"},
            backward_solver={"max_iters": 7},
        ),
    ),
    "monotone": (
        lambda: MonotoneFlow(
            (1, 8, 8),
            g=GNet(kind="dense", act="cpila", depth=2, growth=4, fc_kind="mlp", fc_hidden=(8,)),
            stack=Stack(blocks_per_scale=(1,), fc_blocks=1),
            solvers=Solvers(inverse={"atol": 1e-7}),
            **IMAGE,
        ),
        lambda: MonotoneFlow(
            (1, 8, 8),
            g="dense",
            depth=2,
            growth=4,
            fc_g="mlp",
            fc_hidden=[8],
            blocks_per_scale=[1],
            fc_blocks=1,
            inverse_solver={"atol": 1e-7},
            **IMAGE,
        ),
    ),
}


@pytest.mark.parametrize("family", sorted(TYPED_AND_FLAT))
def test_typed_options_and_config_keys_build_the_same_model(family):
    typed, flat = TYPED_AND_FLAT[family]
    torch.manual_seed(0)
    a = _summary(typed())
    torch.manual_seed(0)
    b = _summary(flat())
    _same(a, b)


def test_options_reach_the_layers_and_blocks():
    flow = ResidualFlow(
        (2,),
        EXACT,
        g=GNet(hidden=(8,), coeff=0.7),
        lipschitz=Lipschitz(rtol=1e-4, max_iters=33),
        stack=Stack(num_blocks=3, actnorm=False),
        solvers=Solvers(inverse={"method": "broyden", "max_iters": 9}, on_fail="raise"),
    )
    blocks = [m for m in flow.modules() if isinstance(m, ResidualBlock)]
    layers = [m for m in flow.modules() if isinstance(m, SpectralNormLinear)]
    assert len(blocks) == 3 and len(layers) == 6
    assert {(m.coeff, m.rtol, m.max_iters) for m in layers} == {(0.7, 1e-4, 33)}
    assert {(b.inverse_solver.method, b.inverse_solver.max_iters, b.on_fail) for b in blocks} == {
        ("broyden", 9, "raise")
    }
    assert [m.out_features for m in layers] == [8, 2] * 3


def test_options_a_family_cannot_use_are_refused():
    with pytest.raises(ConfigError, match="no forward solve"):
        ResidualFlow((2,), solvers=Solvers(forward="picard"))
    with pytest.raises(ConfigError, match="norm=spectral"):
        MonotoneFlow((2,), lipschitz=Lipschitz(norm="induced"))
    with pytest.raises(TypeError, match="nosuch"):
        ImplicitFlow((2,), nosuch=1)


def test_solver_options_reach_every_solve():
    solvers = Solvers(forward={"max_iters": 11}, inverse={"max_iters": 12}, backward={"max_iters": 13}, on_fail="raise")
    imp = ImplicitFlow((2,), EXACT, g=GNet(hidden=(4,)), stack=Stack(num_blocks=2), solvers=solvers)
    blocks = [m for m in imp.modules() if isinstance(m, ImplicitBlock)]
    got = {
        (b.residual_z.inverse_solver.max_iters, b.residual_x.inverse_solver.max_iters)
        + (b.residual_z.backward_solver.max_iters, b.residual_x.backward_solver.max_iters)
        + (b.residual_z.on_fail, b.residual_x.on_fail)
        for b in blocks
    }
    assert len(blocks) == 2 and got == {(11, 12, 13, 13, "raise", "raise")}
    mono = MonotoneFlow((2,), EXACT, g=GNet(hidden=(4,), kind="mlp"), stack=Stack(num_blocks=2), solvers=solvers)
    blocks = [m for m in mono.modules() if isinstance(m, MonotoneBlock)]
    got = {
        (b.forward_solver.max_iters, b.inverse_solver.max_iters, b.backward_solver.max_iters, b.on_fail) for b in blocks
    }
    assert len(blocks) == 2 and got == {(11, 12, 13, "raise")}
    res = ResidualFlow(
        (2,), EXACT, g=GNet(hidden=(4,)), stack=Stack(num_blocks=2), solvers=replace(solvers, forward=None)
    )
    blocks = [m for m in res.modules() if isinstance(m, ResidualBlock)]
    got = {(b.inverse_solver.max_iters, b.backward_solver.max_iters, b.on_fail) for b in blocks}
    assert len(blocks) == 2 and got == {(12, 13, "raise")}
