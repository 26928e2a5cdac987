"""The parts the Lightning module delegates to: objectives built from their config group (and from configurations
stored without ``_target_``), the fault-policy keys of the ``faults`` group, the Lipschitz maintenance callback's
checkpoint of the power-iteration subspaces, and the one figure dispatch."""

from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose
from omegaconf import OmegaConf

from flowforge import experiment
from flowforge.checks import check_moved_keys
from flowforge.errors import ConfigError
from flowforge.training.fault_policy import FaultPolicy
from flowforge.training.lipschitz_maintenance import CHECKPOINT_KEY, LipschitzMaintenance
from flowforge.training.module import FlowModule
from flowforge.training.objectives import BY_NAME, Classification, Hybrid, Objective, Regression, make_objective
from flowforge.training.resume import config_differences
from flowforge.training.visualize import model_figure
from flowforge.trust import check_stored_targets

OBJECTIVES = sorted(p.stem for p in (ROOT / "conf" / "objective").glob("*.yaml"))
SMALL_RESFLOW = ["model=resflow", "model.num_blocks=2", "model.hidden=[8]", "model.fc_blocks=1", "model.fc_hidden=[8]"]


# ---------------------------------------------------------------------------------------------- objectives
@pytest.mark.parametrize("name", OBJECTIVES)
def test_each_objective_config_names_its_class(name):
    """``objective=<name>`` instantiates the class registered for that name, through its ``_target_``."""
    node = OmegaConf.to_container(compose([f"objective={name}"]).objective, resolve=True)
    assert node["name"] == name and "_target_" in node
    objective = make_objective(node)
    assert type(objective) is BY_NAME[name]
    assert isinstance(objective, Objective) and objective.name == name


@pytest.mark.parametrize("name", OBJECTIVES)
def test_a_stored_objective_without_target_maps_to_the_same_class(name):
    node = OmegaConf.to_container(compose([f"objective={name}"]).objective, resolve=True)
    node.pop("_target_")
    assert type(make_objective(node)) is BY_NAME[name]


def test_objective_options_and_defaults_from_the_data():
    model = experiment.instantiate(compose(["model.num_steps=2", "model.hidden=[8]"]).model)
    hybrid = make_objective({"name": "hybrid", "lam": "1/D", "num_classes": None})
    hybrid.bind(model, {"dataset": {"name": "toy2d", "num_classes": 3}})
    assert isinstance(hybrid, Hybrid) and hybrid.lam == 0.5 and hybrid.num_classes == 3
    assert hybrid.classifier is not None and hybrid.classifier.num_classes == 3
    assert make_objective(None).bind(model).name == "mle"
    assert isinstance(make_objective({"name": "classification", "num_classes": 2}), Classification)
    with pytest.raises(ConfigError, match="objective.name=regression does not match Hybrid"):
        Hybrid(name="regression")
    with pytest.raises(ConfigError, match="unknown objective 'contrastive'"):
        Hybrid(name="contrastive")


def test_regression_objective_asks_for_the_fit_figure():
    assert Regression.figure == "fit" and all(cls.figure == "density" for cls in set(BY_NAME.values()) - {Regression})


def test_resume_of_a_run_stored_without_objective_target_sees_no_change():
    new = OmegaConf.to_container(compose(["objective=hybrid", "dataset=digits"]), resolve=True)
    stored = {**new, "objective": {k: v for k, v in new["objective"].items() if k != "_target_"}}
    assert config_differences(stored, new) == []
    other = {**stored, "objective": {**stored["objective"], "name": "classification"}}
    assert [d[0] for d in config_differences(other, new)] == ["objective._target_", "objective.name"]


def test_stored_objective_target_outside_flowforge_is_refused():
    config = {"objective": {"_target_": "os.system", "command": "true"}}
    with pytest.raises(ConfigError, match=r"stores objective\._target_='os\.system', which lies outside"):
        check_stored_targets(config, "x.ckpt")
    check_stored_targets({"objective": {"_target_": "flowforge.training.objectives.Hybrid"}}, "x.ckpt")


# ---------------------------------------------------------------------------------------------- faults group
def test_fault_policy_keys_live_in_the_faults_group():
    cfg = compose(["faults.on_nonfinite=skip", "faults.max_fault_events=3", "+faults.nan_batch=2"])
    policy, injection = experiment._fault_options(cfg)
    assert policy == {
        "on_nonfinite": "skip",
        "on_solver_failure": "warn",
        "on_power_iteration_failure": "warn",
        "fault_lr_factor": 0.5,
        "max_fault_events": 3,
    }
    assert injection == {"nan_batch": 2}
    _, module = experiment.build(cfg)
    (found,) = [cb for cb in module.configure_callbacks() if isinstance(cb, FaultPolicy)]
    assert found.policies["nonfinite"] == "skip" and found.max_fault_events == 3


@pytest.mark.parametrize("override", ["on_nonfinite=skip", "+max_fault_events=2", "fault_lr_factor=0.1"])
def test_old_fault_keys_name_their_new_place(override):
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} is now faults\.{key} \(the faults config group\)"):
        check_moved_keys([override])
    check_moved_keys([f"faults.{override.lstrip('+')}", "model=glow"])


def test_old_fault_key_in_a_run_config_is_refused(tmp_path):
    cfg = compose(["+on_nonfinite=skip", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"on_nonfinite is now faults\.on_nonfinite"):
        experiment.train(cfg)


# ---------------------------------------------------------------------------------------------- Lipschitz
def _resflow_module():
    cfg = compose(["dataset=toy2d", *SMALL_RESFLOW])
    return FlowModule(experiment.instantiate(cfg.model))


def test_power_iteration_subspaces_round_trip_through_a_checkpoint():
    """The callback stores each layer's warm-start subspace under ``lipschitz_subspaces`` (the key checkpoints have
    always used) and installs it again after the weights are loaded."""
    module = _resflow_module()
    module.model.log_prob(torch.randn(16, 2))  # (the first forward initialises the norms)
    from flowforge.nn.lipschitz import update_lipschitz

    update_lipschitz(module.model)
    checkpoint = {}
    LipschitzMaintenance().on_save_checkpoint(None, module, checkpoint)
    saved = checkpoint[CHECKPOINT_KEY]
    assert saved and all(isinstance(v, torch.Tensor) for v in saved.values())
    fresh = _resflow_module()
    fresh.load_state_dict(module.state_dict())
    assert all(fresh.get_submodule(name).subspace_state() is None for name in saved)
    callback = LipschitzMaintenance()
    callback.on_load_checkpoint(None, fresh, checkpoint)
    callback.on_train_start(None, fresh)
    for name, basis in saved.items():
        state = fresh.get_submodule(name).subspace_state()
        torch.testing.assert_close(state.cpu(), basis.to(state.dtype))


def test_lipschitz_option_errors():
    with pytest.raises(ConfigError, match="lipschitz_step_iters must be null or a positive integer, got 0"):
        LipschitzMaintenance(step_iters=0)
    with pytest.raises(ConfigError, match="lipschitz_check_every must be a positive integer"):
        LipschitzMaintenance(check_every=0)


def test_the_module_brings_its_callbacks_by_default():
    kinds = {type(cb) for cb in _resflow_module().configure_callbacks()}
    assert kinds == {FaultPolicy, LipschitzMaintenance}


# ---------------------------------------------------------------------------------------------- figures
def test_one_figure_dispatch(tmp_path):
    model = experiment.instantiate(compose(["model.num_steps=2", "model.hidden=[8]"]).model).eval()
    data = torch.randn(200, 2)
    path = model_figure(model, tmp_path / "d.png", data)
    assert path == tmp_path / "d.png" and Path(path).stat().st_size > 0
    wide = experiment.instantiate(compose(["model.num_steps=2", "model.hidden=[8]", "dataset.shape=[3]"]).model)
    assert model_figure(wide, tmp_path / "none.png", torch.randn(10, 3)) is None
