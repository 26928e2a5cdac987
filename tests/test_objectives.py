"""The flow_matching and reverse_kl objectives and the CNF hooks (RNODE penalty, NFE logging) of the Lightning
module, run in-process through the real Hydra config tree."""

import math

import pytest
from conftest import compose

from flowforge import experiment
from flowforge.errors import ConfigError
from flowforge.training.objectives import parse_objective

FAST = [
    "dataset.n_train=1024",
    "dataset.n_val=256",
    "dataset.n_test=256",
    "dataset.batch_size=128",
    "dataset.eval_batch_size=256",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "callbacks.sample_figures.every_n_epochs=100",
]
RKL = [*FAST, "dataset=target", "objective=reverse_kl", "objective.eval_samples=2048"]


def train(tmp_path, *overrides):
    return experiment.train(compose([*overrides, f"paths.output_dir={tmp_path}"]))


def test_reverse_kl_run_estimates_log_z(tmp_path):
    """A short reverse-KL fit of RealNVP to a two-component mixture logs log Z, its standard error, the ELBO
    and the ESS; the estimate is near the exact log Z and the ELBO below it (up to its own noise)."""
    metrics = train(
        tmp_path,
        *RKL,
        "model=realnvp",
        "model.num_steps=4",
        "model.hidden=[32,32]",
        "model.actnorm=false",
        "dataset.num_components=2",
        "dataset.radius=1.5",
        "dataset.std=0.7",
        "optim.optimizer.lr=3e-3",
        "trainer.max_epochs=30",
    )
    for key in ("log_z", "log_z_se", "log_z_error", "elbo", "ess", "loss", "nll"):
        assert math.isfinite(metrics[f"test/{key}"]), key
    exact = metrics["test/log_z"] - metrics["test/log_z_error"]
    assert abs(metrics["test/log_z_error"]) < max(0.05, 4 * metrics["test/log_z_se"])
    assert metrics["test/elbo"] < exact + 0.02
    assert metrics["test/ess"] > 0.3
    # the loss is log q - log p~, whose mean is KL(q || p) - log Z >= -log Z
    assert metrics["train/loss_epoch"] > -exact - 0.05


def test_reverse_kl_trains_every_pathwise_family(tmp_path):
    """Families with a differentiable inverse take one reverse-KL step; planar (bisection inverse) is refused
    unless it is built in the sampling direction."""
    for model, extra in (
        ("planar", ["model.direction=sampling"]),
        ("radial", []),
        ("maf", ["model.hidden=[8]"]),
        ("resflow", ["model.num_blocks=1", "model.hidden=[8]"]),
    ):
        m = train(tmp_path / model, *RKL, f"model={model}", *extra, "+trainer.fast_dev_run=true")
        assert math.isfinite(m["test/loss"]), model
    with pytest.raises(ConfigError, match="direction=sampling"):
        train(tmp_path / "planar_density", *RKL, "model=planar", "+trainer.fast_dev_run=true")


def test_reverse_kl_needs_a_target_and_checks_its_options(tmp_path):
    with pytest.raises(ConfigError, match="dataset=target"):
        train(tmp_path, *FAST, "dataset=toy2d", "objective=reverse_kl", "+trainer.fast_dev_run=true")
    with pytest.raises(ConfigError, match="eval_samples"):
        parse_objective({"name": "reverse_kl", "eval_samples": 1}, 2)
    with pytest.raises(ConfigError, match="n_samples"):
        parse_objective({"name": "reverse_kl", "n_samples": -3}, 2)
    assert parse_objective({"name": "flow_matching"}, 2) == {"name": "flow_matching"}


CNF = [*FAST, "dataset=toy2d", "model=cnf", "model.hidden=[16,16]", "model.train_t1=false"]


def test_flow_matching_trains_the_velocity_and_evaluates_the_likelihood(tmp_path):
    """objective=flow_matching: the training loss is the flow-matching regression (it falls), validation and
    test report the ODE likelihood next to it, and the likelihood improves on the untrained model's."""
    untrained = train(tmp_path / "untrained", *CNF, "objective=flow_matching", "train=false")
    m = train(tmp_path / "fm", *CNF, "objective=flow_matching", "trainer.max_epochs=10", "optim.optimizer.lr=3e-3")
    for key in ("test/fm", "test/nll", "test/loss"):
        assert math.isfinite(m[key]), key
    assert m["test/loss"] == pytest.approx(m["test/nll"])  # val/test loss is the likelihood, comparable with mle
    assert m["test/nll"] < untrained["test/nll"] - 0.3
    assert m["test/fm"] < untrained["test/fm"] - 0.5


def test_flow_matching_refuses_models_without_a_single_velocity_field(tmp_path):
    for extra in (["model.num_blocks=2"], ["model.augment_dim=2"]):
        with pytest.raises(ConfigError, match="num_blocks=1"):
            train(tmp_path, *CNF, "objective=flow_matching", *extra, "+trainer.fast_dev_run=true")
    with pytest.raises(ConfigError, match="num_blocks=1"):
        train(tmp_path, *FAST, "model=realnvp", "objective=flow_matching", "+trainer.fast_dev_run=true")


def test_rnode_penalty_joins_the_loss_and_nfe_is_logged(tmp_path):
    """With model.kinetic = w the first training loss is the NLL plus w times the logged kinetic integral (same
    seed, same batch, same weights); every step logs the forward and adjoint function evaluations."""
    plain = train(tmp_path / "plain", *CNF, "+trainer.fast_dev_run=true", "model.atol=1e-7", "model.rtol=1e-7")
    reg = train(
        tmp_path / "reg",
        *CNF,
        "+trainer.fast_dev_run=true",
        "model.atol=1e-7",
        "model.rtol=1e-7",
        "model.kinetic=0.5",
        "model.jacobian=0.25",
    )
    assert "train/reg/kinetic" not in plain and reg["train/reg/kinetic"] > 0 and reg["train/reg/jacobian"] > 0
    expected = plain["train/loss_step"] + 0.5 * reg["train/reg/kinetic"] + 0.25 * reg["train/reg/jacobian"]
    assert reg["train/loss_step"] == pytest.approx(expected, abs=1e-4)
    for m in (plain, reg):
        assert m["train/nfe/forward"] >= 6 and m["train/nfe/backward"] >= 6  # dopri5: >= 1 step of 6 stages


@pytest.mark.parametrize("name", ["flow_matching_toy", "reverse_kl_mixture", "sphere_vmf", "ffjord_toy"])
def test_cpu_experiments_run(name, tmp_path):
    """The CPU recipes of the README run end to end (one batch of each stage) and report their metrics."""
    m = train(
        tmp_path,
        f"experiment={name}",
        "+trainer.fast_dev_run=true",
        "+dataset.limit=64",
        "dataset.batch_size=32",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
    )
    assert math.isfinite(m["test/loss"])
    if name == "reverse_kl_mixture":
        assert math.isfinite(m["test/log_z"]) and 0 < m["test/ess"] <= 1


@pytest.mark.parametrize("name", ["ffjord_mnist", "ffjord_cifar10"])
def test_ffjord_image_recipes_build(name):
    """The paper-size FFJORD recipes compose and build their multiscale model (not trained here)."""
    from conftest import instantiate_model

    cfg = compose([f"experiment={name}"])
    flow = instantiate_model(cfg)
    assert flow.data_shape == tuple(cfg.dataset.shape)
    assert sum(1 for m in flow.modules() if type(m).__name__ == "CNF") >= 2 * cfg.model.num_scales - 1
