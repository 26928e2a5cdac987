"""The 1-D fitting and 2-D toy experiments of Implicit / Monotone Flows: the regression objective (loss by
hand, clear errors), the fit1d_* / *_toy experiment configs and their sweeps (one fast_dev_run each, with
fit.csv and figures written), and ``python -m flowforge.figures`` on the runs."""

import csv
import json
import os

import forked
import pytest
import torch
from conftest import ROOT, compose

from flowforge import experiment, figures
from flowforge.errors import ConfigError
from flowforge.training.module import FlowModule

FIT1D = ["fit1d_resflow", "fit1d_resflow_actnorm", "fit1d_impflow", "fit1d_monotone"]
TOYS = ["idensenet_toy", "monotone_toy"]
QUIET = ["+trainer.fast_dev_run=true", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]


def sh(*args, timeout=300):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = forked.run(args, cwd=ROOT, env=env, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def regression_module(dim=2):
    cfg = compose(["model=realnvp", "model.num_steps=2", "model.hidden=[8]", f"dataset.shape=[{dim}]"])
    return FlowModule(
        experiment.instantiate(cfg.model), objective={"name": "regression"}, config={"dataset": {"name": "toy2d"}}
    )


# ---------------------------------------------------------------------------------------------- objective
def test_regression_loss_is_the_squared_error_by_hand():
    module = regression_module(dim=2)
    x, y = torch.randn(64, 2), torch.randn(64, 2)
    values = module.step_metrics((y, x), y)
    with torch.no_grad():
        z = module.model(x)[0]
    by_hand = (z[:, 0] - y[:, 0]) ** 2 + (z[:, 1] - y[:, 1]) ** 2  # summed over the 2 dims
    torch.testing.assert_close(values["loss"], by_hand)
    torch.testing.assert_close(values["loss"].mean(), torch.mean(torch.sum((z - y) ** 2, 1)))
    torch.testing.assert_close(values["mse"].mean(), torch.mean((z - y) ** 2))  # per dimension
    values["loss"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert module.classifier is None and "nll" not in values


@pytest.mark.parametrize(
    "batch",
    [
        lambda: [torch.randn(8, 2)],  # toy2d: no second tensor
        lambda: [torch.randn(8, 2), torch.randint(0, 10, (8,))],  # labelled data: integer classes
    ],
)
def test_regression_without_inputs_names_step1d(batch):
    module = regression_module(dim=2)
    b = batch()
    with pytest.raises(ConfigError, match="dataset=step1d"):
        module.step_metrics(b, b[0])


def test_regression_on_toy2d_run_fails_with_the_fix(tmp_path):
    cfg = compose(
        [
            "objective=regression",
            "dataset.n_train=200",
            "dataset.n_val=100",
            "dataset.n_test=100",
            "model.num_steps=2",
            "model.hidden=[8]",
            *QUIET,
            f"paths.output_dir={tmp_path}",
        ]
    )
    with pytest.raises(ConfigError, match="dataset=step1d"):
        experiment.train(cfg)


def test_unknown_objective_lists_regression():
    with pytest.raises(ConfigError, match="regression"):
        FlowModule(regression_module().model, objective={"name": "regresion"})


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", FIT1D)
def test_fit1d_configs_hold_the_paper_settings(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.task_name == name and cfg.objective.name == "regression" and cfg.estimator.name == "exact"
    assert cfg.dataset.name == "step1d" and cfg.dataset.batch_size == 5000
    assert cfg.optim.optimizer.lr == 0.01 and cfg.model.coeff == 0.99 and cfg.trainer.max_steps == 15000
    assert cfg.trainer.max_epochs == -1  # else max_epochs (4 steps each) would end the run early
    expected = {
        "fit1d_resflow": ("ResidualFlow", 2, False),
        "fit1d_resflow_actnorm": ("ResidualFlow", 2, True),
        "fit1d_impflow": ("ImplicitFlow", 1, True),
        "fit1d_monotone": ("MonotoneFlow", 2, True),
    }[name]
    assert (cfg.model._target_.rsplit(".", 1)[1], cfg.model.num_blocks, cfg.model.actnorm) == expected
    assert cfg.model.act == "crelu" and cfg.optim.optimizer.weight_decay == 0  # mlvlab/MonotoneFlows' commands
    if cfg.model.get("g") == "dense":
        assert (cfg.model.depth, cfg.model.growth, cfg.model.lip_coeff) == (4, 128, 0.99)
        assert cfg.callbacks.concat_schedule.start_epoch == 0


def test_fit1d_models_have_comparable_capacity():
    counts = {}
    for name in FIT1D:
        model = experiment.instantiate(compose([f"experiment={name}"]).model)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["fit1d_resflow_actnorm"] == counts["fit1d_monotone"]  # same 2 g networks, both with ActNorm
    assert max(counts.values()) <= 1.05 * min(counts.values()), counts


@pytest.mark.parametrize(
    "name,target,act", [("idensenet_toy", "ResidualFlow", "clipswish"), ("monotone_toy", "MonotoneFlow", "cpila")]
)
def test_toy_configs(name, target, act):
    cfg = compose([f"experiment={name}", "dataset.name=moons"])
    assert cfg.model._target_.endswith(target) and cfg.model.act == act and cfg.model.g == "dense"
    assert (cfg.model.num_blocks, cfg.model.depth, cfg.model.growth) == (10, 3, 16)
    assert cfg.estimator.name == "exact" and cfg.dataset.batch_size == 500 and cfg.trainer.max_steps == 50000
    assert cfg.optim.optimizer.lr == 1e-3 and cfg.dataset.name == "moons"
    assert cfg.model.coeff == 0.9 and cfg.callbacks.concat_schedule.start_epoch == 625  # train_toy.py, README


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def fit1d_sweep(tmp_path_factory):
    """sweeps/fit1d.yaml as documented: one fast_dev_run per variant."""
    sweep = tmp_path_factory.mktemp("fit1d")
    code, out = sh(
        "train.py",
        "-m",
        "--config-dir",
        "sweeps",
        "--config-name",
        "fit1d",
        *QUIET,
        "dataset.n_train=5000",
        "dataset.n_val=500",
        "dataset.n_test=500",
        f"hydra.sweep.dir={sweep}",
    )
    assert code == 0, out[-4000:]
    return sweep


def test_fit1d_sweep_runs_every_variant_and_writes_fits(fit1d_sweep):
    for i, name in enumerate(FIT1D):
        run = fit1d_sweep / f"{i}_{name}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["test/mse"] == pytest.approx(metrics["test/loss"]) and 0 <= metrics["test/mse"] < 10
        assert (run / "figures" / "test.png").stat().st_size > 0
        with (run / "figures" / "fit.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 400 and list(rows[0]) == ["x", "target", "prediction"]
        assert float(rows[0]["x"]) == -2 and float(rows[-1]["x"]) == 2
        assert float(rows[0]["target"]) == pytest.approx(-2.0)  # step_function(-2)
        assert f"experiment={name}" in (run / ".hydra" / "overrides.yaml").read_text()


def test_figures_fit1d_draws_the_runs_and_prints_a_table(fit1d_sweep, tmp_path, capsys):
    runs = [fit1d_sweep / "0_fit1d_resflow", fit1d_sweep / "3_fit1d_monotone"]
    out = tmp_path / "fit1d.png"
    assert figures.main(["fit1d", *map(str, runs), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    table = capsys.readouterr().out
    mse = json.loads((runs[1] / "metrics.json").read_text())["test/mse"]
    assert "| variant | test MSE |" in table and "| fit1d_resflow |" in table
    assert f"| fit1d_monotone | {mse:.4g} |" in table
    assert figures.main(["fit1d", str(tmp_path), "--out", str(out)]) == 2  # no fit.csv: a clear error
    assert "objective=regression" in capsys.readouterr().err


@pytest.mark.slow
def test_toy_sweep_and_figure(tmp_path):
    """sweeps/toy2d_monotone.yaml on one toy (both models), then the toy2d figure and table."""
    sweep = tmp_path / "toys"
    code, out = sh(
        "train.py",
        "-m",
        "--config-dir",
        "sweeps",
        "--config-name",
        "toy2d_monotone",
        *QUIET,
        "dataset.name=moons",
        "dataset.n_train=1000",
        "dataset.n_val=500",
        "dataset.n_test=500",
        "dataset.eval_batch_size=500",
        f"hydra.sweep.dir={sweep}",
    )
    assert code == 0, out[-4000:]
    runs = [sweep / "0_idensenet_toy_moons", sweep / "1_monotone_toy_moons"]
    for run in runs:
        assert (run / "figures" / "test.png").exists()
        assert json.loads((run / "metrics.json").read_text())["test/nll"] < 10
    code, out = sh(
        "-m",
        "flowforge.figures",
        "toy2d",
        *map(str, runs),
        str(sweep / "multirun.yaml"),
        "--out",
        str(tmp_path / "toys.png"),
    )
    assert code == 0, out
    assert (tmp_path / "toys.png").stat().st_size > 0
    assert "| moons |" in out and "idensenet_toy test NLL" in out and "monotone_toy test NLL" in out
