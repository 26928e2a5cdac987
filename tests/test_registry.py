"""The family registry: every model config has a family and every family a config; the declarations match the
models they build; the README's families table is the registry's; smoke sizes come from it; and a family
written outside the repository (one module and one config in a temporary directory) runs through the generic
suites."""

import os
import sys
import textwrap

import forked
import pytest
import torch
import yaml
from conftest import FAMILIES, ROOT, SMALL, compose, instantiate_model

from flowforge.errors import ConfigError
from flowforge.flows import registry
from flowforge.flows.base import samples_pathwise
from flowforge.flows.registry import Family, families_table, model_configs, register_family
from flowforge.nn.lipschitz import lipschitz_layers


@pytest.fixture
def isolated(monkeypatch):
    """Registrations made by the test are dropped afterwards."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry.families()))


def test_every_model_config_has_its_family_and_every_family_a_config():
    stems = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    paired = model_configs(ROOT / "conf")
    assert sorted(paired) == stems == sorted(registry.families())
    for name, f in paired.items():
        node = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
        assert node["_target_"] == f.target, name


def test_a_config_without_a_family_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "lonely.yaml"
    path.write_text("_target_: flowforge.flows.planar.Planar\nshape: ${dataset.shape}\n")
    with pytest.raises(ConfigError, match=r"lonely\.yaml has no registered flow family 'lonely'") as info:
        model_configs(ROOT / "conf", tmp_path)
    assert "register_family(Planar, 'lonely'" in str(info.value)


def test_a_config_naming_another_factory_is_an_error(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "glow.yaml").write_text("_target_: flowforge.flows.realnvp.RealNVP\n")
    with pytest.raises(ConfigError, match=r"glow\.yaml builds flowforge\.flows\.realnvp\.RealNVP.*glow\.Glow"):
        model_configs(tmp_path, ROOT / "conf")


def test_a_family_without_a_config_names_the_file_to_add(isolated):
    register_family(torch.nn.Identity, "orphan", title="orphan")
    with pytest.raises(
        ConfigError, match=r"'orphan' \(torch\.nn\.modules\.linear\.Identity\) has no config.*orphan\.yaml"
    ):
        model_configs(ROOT / "conf")


def test_declarations_are_checked(isolated):
    with pytest.raises(ConfigError, match="two flow families are named 'glow'"):
        register_family(torch.nn.Identity, "glow", title="another glow")
    with pytest.raises(ConfigError, match="declare exact_test"):
        register_family(torch.nn.Identity, "noisy", title="noisy", log_det="estimated")
    with pytest.raises(ConfigError, match="log_det must be one of"):
        register_family(torch.nn.Identity, "noisy", title="noisy", log_det="approximate")
    with pytest.raises(ConfigError, match="exactly one manifold"):
        register_family(torch.nn.Identity, "odd", title="odd", data=("sphere", "vector"))
    # the same factory again (a module imported twice) replaces its declaration
    glow = registry.family("glow")
    register_family(glow.factory, "glow", title="Glow, again")
    assert registry.family("glow").title == "Glow, again" and registry.family("glow").factory is glow.factory
    with pytest.raises(ConfigError, match="no flow family is registered as 'nope'; registered: cnf, glow"):
        registry.family("nope")


def test_shape_limits():
    iaf, nsf, sphere, planar = (registry.family(n) for n in ("iaf", "nsf", "sphere", "planar"))
    assert nsf.shape_limit([1]) == "min_dim" and nsf.shape_limit([2]) is None
    assert planar.shape_limit([1, 8, 8]) == "image" and nsf.shape_limit([1, 8, 8]) is None
    assert sphere.shape_limit([3]) == "manifold" and sphere.shape_limit([3], "simplex") == "manifold"
    assert sphere.shape_limit([3], "sphere") is None
    assert iaf.shape_limit([3, 8, 8], options={"max_density_passes": 100}) == "max_dim"
    assert iaf.shape_limit([1, 8, 8], options={"max_density_passes": 64}) is None


def _dataset_for(f: Family) -> str:
    if f.manifold is None:
        return "toy2d"
    for p in sorted((ROOT / "conf" / "dataset").glob("*.yaml")):
        if (yaml.safe_load(p.read_text()) or {}).get("manifold") == f.manifold:
            return p.stem
    raise AssertionError(f"no dataset lies on {f.manifold}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_declared_capabilities_match_the_model(name):
    """log-det, pathwise sampling and per-step maintenance as declared, on the model the config builds."""
    f = FAMILIES[name]
    flow = instantiate_model(compose([f"model={name}", f"dataset={_dataset_for(f)}", *SMALL[name]]))
    estimated = any(hasattr(m, "logdet_estimator") for m in flow.modules())
    assert estimated == (f.log_det == "estimated")
    assert bool(lipschitz_layers(flow)) == f.maintenance
    assert not flow.conditional
    # conditional as declared: with a context the family builds p(x | c), or refuses the context clearly
    with_context = [f"model={name}", f"dataset={_dataset_for(f)}", *SMALL[name], "model.context={features: 2}"]
    if f.conditional:
        assert instantiate_model(compose(with_context)).conditional
    else:
        with pytest.raises(ConfigError, match="does not condition on a context"):
            instantiate_model(compose(with_context))
    if isinstance(f.pathwise, str):
        assert not samples_pathwise(flow.transform)
        flow = instantiate_model(compose([f"model={name}", f"dataset={_dataset_for(f)}", *SMALL[name], f.pathwise]))
        assert samples_pathwise(flow.transform)
    else:
        assert samples_pathwise(flow.transform) == f.pathwise


def test_readme_carries_the_families_table():
    table = families_table()
    assert table.count("\n") == len(registry.families()) + 2
    assert table in (ROOT / "README.md").read_text()


def test_error_messages_list_families_from_the_registry():
    from flowforge.flows.model import vector_dim

    with pytest.raises(ConfigError) as info:
        vector_dim((1, 8, 8), "planar")
    images = [n for n, f in registry.families().items() if f.images]
    assert f"({', '.join(images)})" in str(info.value) and "resflow" in images and "planar" not in images


def test_smoke_sizes_come_from_the_family():
    from flowforge.smoke import shrink

    cfg = shrink(compose(["model=resflow", "model.g=dense"]))
    assert cfg.model.num_blocks == 2 and cfg.model.growth == 4 and cfg.model.fc_growth == 8
    cfg = shrink(compose(["model=iresnet"]))
    assert cfg.model.num_blocks == 2 and cfg.model.growth == 16  # IResNet's smoke sizes leave the dense g alone
    cfg = compose(["model=planar"])
    cfg.model._target_ = "flowforge.flows.planar.Planar"  # a layer, not a family's factory
    with pytest.raises(ConfigError, match="smoke=true needs the smoke sizes.*Planar"):
        shrink(cfg)


# ----------------------------------------------------------------------------- a family from outside
THROWAWAY = '''
"""A throwaway family: elementwise affine layers z = x exp(s) + b, log |det| = sum(s)."""
import math

import torch

from flowforge.flows.base import Transform
from flowforge.flows.model import build_flow, flatten_images
from flowforge.flows.registry import register_family


class ElementwiseAffine(Transform):
    def __init__(self, dim):
        super().__init__()
        self.s, self.b = torch.nn.Parameter(torch.zeros(dim)), torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.s.exp() + self.b, self.s.sum().expand(x.shape[0])

    def inverse(self, z):
        return (z - self.b) * torch.exp(-self.s)


def scale_flow(shape, num_layers=2, base="normal", num_levels=None, logit_alpha=None):
    layers = [ElementwiseAffine(math.prod(shape)) for _ in range(num_layers)]
    return build_flow(shape, flatten_images(shape, layers), base, num_levels, logit_alpha)
'''
DECLARATION = """
register_family(scale_flow, "throwaway", title="Elementwise affine", test=("model.num_layers=1",), smoke={})
"""
CONFIG = """
_target_: {module}.scale_flow
shape: ${{dataset.shape}}
num_levels: ${{dataset.num_levels}}
logit_alpha: ${{dataset.logit_alpha}}
num_layers: 2
base: normal
"""


def write_family(root, module, declared=True):
    """One module (on ``root``) and one config (``root/conf/model/throwaway.yaml``): the whole family."""
    (root / f"{module}.py").write_text(textwrap.dedent(THROWAWAY) + (DECLARATION if declared else ""))
    (root / "conf" / "model").mkdir(parents=True)
    (root / "conf" / "model" / "throwaway.yaml").write_text(CONFIG.format(module=module))


@pytest.mark.slow
def test_a_family_is_one_module_and_one_config(tmp_path):
    """The generic suites build the throwaway family, compare its log-det with the brute-force Jacobian in float64,
    invert it, sample it, save and load it, and train it (fast_dev_run) on vectors and images: 10 cases of
    test_models and 3 of test_combinations, with nothing in the repository edited."""
    write_family(tmp_path, "throwaway_flows")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    env["FLOWFORGE_CONFIG_PATH"] = str(tmp_path / "conf")
    env.pop("PYTEST_XDIST_WORKER", None)
    command = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    command += [
        "tests/test_models.py",
        "tests/test_combinations.py",
        "-k",
        "throwaway and (toy2d or digits or step1d) and not conditional",
    ]
    proc = forked.run(command, cwd=ROOT, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "13 passed" in out, out[-4000:]


def test_a_family_without_its_declaration_is_a_clear_error(tmp_path, monkeypatch):
    write_family(tmp_path, "throwaway_undeclared", declared=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"throwaway\.yaml has no registered flow family 'throwaway'") as info:
            model_configs(ROOT / "conf", tmp_path / "conf")
        assert "register_family(scale_flow, 'throwaway'" in str(info.value)
    finally:
        sys.modules.pop("throwaway_undeclared", None)
