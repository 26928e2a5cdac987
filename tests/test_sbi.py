"""Simulation-based inference: the sbibm tasks' simulators against known moments, the reference-posterior files
(written here in sbibm's format) and their errors, C2ST, the sbi data module, and amortised posterior estimation
(NPE) on gaussian_linear measured by C2ST against the closed-form posterior."""

import bz2
import math

import numpy as np
import pytest
import torch
from conftest import compose

from flowforge.data.sbi import SBIDataModule
from flowforge.errors import ConfigError, DataError
from flowforge.metrics import c2st
from flowforge.sbi.reference import load_reference, read_csv
from flowforge.sbi.tasks import TASKS, make_task

N = 20000  # simulations per parameter in the moment checks: Monte Carlo errors ~ 1/sqrt(N) < 1%


def _repeat(task, theta, seed=0):
    g = torch.Generator().manual_seed(seed)
    return task.simulate(theta.reshape(1, -1).expand(N, -1).contiguous(), g)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prior_and_simulator_shapes(name):
    task = make_task(name)
    g = torch.Generator().manual_seed(0)
    theta = task.sample_prior(64, g)
    x = task.simulate(theta, g)
    assert theta.shape == (64, task.dim_theta) and x.shape == (64, task.dim_x)
    assert theta.dtype == x.dtype == torch.float32 and torch.isfinite(x).all()
    assert task.in_support(theta).all()
    # seeded: the same generator seed gives the same simulations
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(task.simulate(task.sample_prior(64, g2), g2), x)


def test_gaussian_linear_moments():
    task = make_task("gaussian_linear")
    theta = torch.linspace(-0.5, 0.5, 10)
    x = _repeat(task, theta).double()
    # E[x | theta] = theta, Var[x_i | theta] = 0.1 (standard error of the mean 0.0022)
    assert torch.allclose(x.mean(0), theta.double(), atol=0.012)
    assert torch.allclose(x.var(0), torch.full((10,), 0.1, dtype=torch.float64), rtol=0.05)
    prior = task.sample_prior(N, torch.Generator().manual_seed(1)).double()
    assert torch.allclose(prior.var(0), torch.full((10,), 0.1, dtype=torch.float64), rtol=0.05)


def test_gaussian_mixture_moments():
    task = make_task("gaussian_mixture")
    theta = torch.tensor([2.0, -3.0])
    x = _repeat(task, theta).double()
    # E[x | theta] = theta; Var = 1/2 * 1 + 1/2 * 0.01; a quarter of the points lie within 0.1 (the narrow component)
    assert torch.allclose(x.mean(0), theta.double(), atol=0.03)
    assert torch.allclose(x.var(0), torch.full((2,), 0.505, dtype=torch.float64), rtol=0.05)
    narrow = ((x - theta.double()).abs() < 0.3).all(1).double().mean()
    assert abs(float(narrow) - (0.5 + 0.5 * math.erf(0.3 / math.sqrt(2)) ** 2)) < 0.02


def test_two_moons_moments():
    task = make_task("two_moons")
    theta = torch.tensor([0.3, -0.6])
    x = _repeat(task, theta).double()
    z0 = math.cos(-math.pi / 4) * 0.3 - math.sin(-math.pi / 4) * -0.6
    z1 = math.sin(-math.pi / 4) * 0.3 + math.cos(-math.pi / 4) * -0.6
    # E[r cos a] = 0.1 * 2 / pi for a ~ U(-pi/2, pi/2); E[r sin a] = 0
    expected = torch.tensor([0.2 / math.pi + 0.25 - abs(z0), z1], dtype=torch.float64)
    assert torch.allclose(x.mean(0), expected, atol=0.002)
    # the points lie on a half circle of radius ~0.1 around (0.25 - |z0|, z1)
    centre = torch.tensor([0.25 - abs(z0), z1], dtype=torch.float64)
    radius = (x - centre).norm(dim=1)
    assert abs(float(radius.mean()) - 0.1) < 0.002 and (x[:, 0] >= centre[0] - 0.05).all()


def test_slcp_moments():
    task = make_task("slcp")
    theta = torch.tensor([0.7, -1.2, 1.1, -0.9, 0.8])
    points = _repeat(task, theta).double().reshape(N, 4, 2)
    s1, s2, rho = 1.1**2, 0.9**2, math.tanh(0.8)
    cov = torch.tensor([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]], dtype=torch.float64)
    for j in range(4):  # four independent draws of N(m, S)
        p = points[:, j]
        assert torch.allclose(p.mean(0), theta[:2].double(), atol=0.03)
        assert torch.allclose(torch.cov(p.T), cov, atol=0.05 * float(cov.abs().max()))
    assert abs(float(torch.corrcoef(torch.stack([points[:, 0, 0], points[:, 1, 0]]))[0, 1])) < 0.03


def test_bernoulli_glm_moments():
    task = make_task("bernoulli_glm")
    theta = task.sample_prior(1, torch.Generator().manual_seed(3))[0]
    x = _repeat(task, theta).double()
    rate = torch.sigmoid(task.design.double() @ theta.double())
    # x = (number of spikes, sum_t y_t I_{t-s}): E[x] = (sum_t rate_t, sum_t rate_t I_{t-s})
    expected = torch.cat([rate.sum(0, keepdim=True), task.design.double()[:, 1:].T @ rate])
    stderr = x.std(0) / math.sqrt(N)
    assert ((x.mean(0) - expected).abs() < 5 * stderr + 1e-9).all()
    # the design matrix: an offset column and nine lags of the white-noise stimulus
    assert torch.equal(task.design[:, 0], torch.ones(100))
    assert torch.equal(task.design[3:, 4], task.design[:-3, 1])
    # prior N(0, B^-1)
    prior = task.sample_prior(N, torch.Generator().manual_seed(4)).double()
    assert torch.allclose(torch.cov(prior.T), torch.linalg.inv(task.precision), atol=0.15)


def test_gaussian_linear_closed_form_posterior_against_the_simulator():
    """E[theta | x] = x / 2 and Var[theta | x] = 0.05: regress the prior draws on their simulations."""
    task = make_task("gaussian_linear")
    g = torch.Generator().manual_seed(5)
    theta = task.sample_prior(50000, g).double()
    x = task.simulate(theta.float(), g).double()
    coef = torch.linalg.lstsq(x, theta).solution  # the Gaussian posterior mean is linear in x
    assert torch.allclose(coef, 0.5 * torch.eye(10, dtype=torch.float64), atol=0.02)
    resid = theta - x @ coef
    assert torch.allclose(resid.var(0), torch.full((10,), 0.05, dtype=torch.float64), rtol=0.05)
    mean, var = task.posterior_params(x[0])
    assert var == pytest.approx(0.05) and torch.allclose(mean, x[0] / 2)
    post = task.posterior_sample(x[0].float(), 20000, g).double()
    assert torch.allclose(post.mean(0), x[0] / 2, atol=0.01) and torch.allclose(post.var(0), resid.var(0), rtol=0.06)


def test_gaussian_mixture_posterior_against_a_grid():
    """Exact draws of the truncated mixture posterior have the moments of prior x likelihood on a fine grid."""
    task = make_task("gaussian_mixture")
    x_o = torch.tensor([9.6, -2.0])  # near the prior's edge: truncation matters
    post = task.posterior_sample(x_o, 40000, torch.Generator().manual_seed(6)).double()
    assert task.in_support(post.float()).all()
    grid = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    t0, t1 = torch.meshgrid(grid, grid, indexing="ij")
    d2 = (t0 - 9.6) ** 2 + (t1 + 2.0) ** 2
    dens = 0.5 * torch.exp(-0.5 * d2) / (2 * math.pi) + 0.5 * torch.exp(-0.5 * d2 / 0.01) / (2 * math.pi * 0.01)
    dens = dens / dens.sum()
    m0, m1 = float((dens * t0).sum()), float((dens * t1).sum())
    assert post[:, 0].mean() == pytest.approx(m0, abs=0.01) and post[:, 1].mean() == pytest.approx(m1, abs=0.01)
    assert float(post[:, 0].var()) == pytest.approx(float((dens * (t0 - m0) ** 2).sum()), rel=0.03)


# ----------------------------------------------------------------------------- reference files


def _write_csv(path, prefix, rows, compress=False):
    header = ",".join(f"{prefix}_{i + 1}" for i in range(rows.shape[1]))
    text = header + "\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in rows) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bz2.compress(text.encode()) if compress else text.encode())


def _write_task_files(root, task, num_observations=2, samples=50, seed=0):
    """Files of ``task`` in sbibm's layout and format under ``root``; returns what was written."""
    rng = np.random.default_rng(seed)
    written = []
    for k in range(1, num_observations + 1):
        where = root / "sbibm" / "tasks" / task.name / "files" / f"num_observation_{k}"
        obs, truth = rng.normal(size=(1, task.dim_x)), rng.uniform(-0.5, 0.5, size=(1, task.dim_theta))
        ref = rng.uniform(-0.9, 0.9, size=(samples, task.dim_theta))
        _write_csv(where / "observation.csv", "data", obs)
        _write_csv(where / "true_parameters.csv", "parameter", truth)
        _write_csv(where / "reference_posterior_samples.csv.bz2", "parameter", ref, compress=True)
        written.append((obs, truth, ref))
    return written


def test_reference_files_are_read(tmp_path):
    task = make_task("two_moons")
    written = _write_task_files(tmp_path, task)
    ref = load_reference(task, tmp_path, num_observations=2)
    assert ref.source.endswith("two_moons/files")
    for k, (obs, truth, samples) in enumerate(written):
        assert torch.allclose(ref.observations[k].double(), torch.from_numpy(obs[0]), atol=1e-6)
        assert torch.allclose(ref.true_parameters[k].double(), torch.from_numpy(truth[0]), atol=1e-6)
        assert ref.samples[k].shape == (50, 2)
        assert torch.allclose(ref.samples[k].double(), torch.from_numpy(samples), atol=1e-6)


def test_missing_reference_files_say_where_to_get_them(tmp_path):
    with pytest.raises(DataError, match="pip download sbibm"):
        load_reference(make_task("slcp"), tmp_path / "empty")
    # an analytic task falls back to its closed form
    ref = load_reference(make_task("gaussian_linear"), tmp_path / "empty", num_observations=3)
    assert ref.source == "closed form" and ref.observations.shape == (3, 10) and ref.samples[0].shape == (10000, 10)
    # observation 3 is missing its samples file
    task = make_task("two_moons")
    _write_task_files(tmp_path, task, num_observations=3)
    (tmp_path / "sbibm/tasks/two_moons/files/num_observation_3/reference_posterior_samples.csv.bz2").unlink()
    with pytest.raises(DataError, match="num_observation_3.*does not exist.*pip download sbibm"):
        load_reference(task, tmp_path, num_observations=3)


def test_an_installed_sbibm_package_is_found_without_importing_it(tmp_path, monkeypatch):
    import importlib.machinery
    import importlib.util
    import sys

    task = make_task("slcp")
    _write_task_files(tmp_path / "site", task, num_observations=1)
    spec = importlib.machinery.ModuleSpec("sbibm", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "site" / "sbibm")]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "sbibm" else real(name, *a))
    ref = load_reference(task, tmp_path / "empty", num_observations=1)
    assert ref.source == str(tmp_path / "site" / "sbibm" / "tasks" / "slcp" / "files")
    assert "sbibm" not in sys.modules


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda p: p.write_bytes(b"not bz2 at all"), "corrupt"),
        (lambda p: p.write_bytes(bz2.compress(b"theta_1,theta_2\n0.1,0.2\n")), "header"),
        (lambda p: p.write_bytes(bz2.compress(b"parameter_1,parameter_2\n0.1,nan\n")), "NaN"),
        (lambda p: p.write_bytes(bz2.compress(b"parameter_1,parameter_2\n0.1,abc\n")), "malformed"),
        (lambda p: p.write_bytes(bz2.compress(b"parameter_1,parameter_2,parameter_3\n0.1,0.2,0.3\n")), "header"),
    ],
)
def test_corrupt_reference_files_are_clear_errors(tmp_path, damage, match):
    task = make_task("two_moons")
    _write_task_files(tmp_path, task, num_observations=1)
    path = tmp_path / "sbibm/tasks/two_moons/files/num_observation_1/reference_posterior_samples.csv.bz2"
    damage(path)
    with pytest.raises(DataError, match=match) as info:
        load_reference(task, tmp_path, num_observations=1)
    assert str(path) in str(info.value)


def test_an_observation_file_must_hold_one_row(tmp_path):
    path = tmp_path / "observation.csv"
    _write_csv(path, "data", np.zeros((2, 3)))
    with pytest.raises(DataError, match="expected 1 rows of 3"):
        read_csv(path, "data", 3, rows=1)


# ----------------------------------------------------------------------------- C2ST


def test_c2st_sanity():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    same = c2st(a, b)
    assert abs(same - 0.5) < 0.05  # one distribution: chance accuracy (the fold accuracies' s.e. ~ 0.016)
    assert c2st(a, b + 3.0) > 0.95  # separated by 3 standard deviations: ~ Phi(1.5) = 0.93 for a linear rule, more
    # z-scoring with the reference's statistics: a common affine change of units changes nothing
    assert c2st(100 * a + 7, 100 * b + 7) == pytest.approx(same, abs=0.02)
    with pytest.raises(DataError, match="one dimension"):
        c2st(a, torch.randn(10, 3))


# ----------------------------------------------------------------------------- the data module


def test_data_module_splits_and_standardisation(tmp_path):
    dm = SBIDataModule(task="gaussian_linear", num_simulations=1000, num_observations=2, data_dir=str(tmp_path))
    dm.setup()
    theta, x = dm.splits["train"].tensors
    assert theta.shape == (900, 10) and x.shape == (900, 10) and len(dm.splits["val"]) == 100
    assert torch.allclose(theta.mean(0), torch.zeros(10), atol=1e-5) and torch.allclose(theta.std(0), torch.ones(10))
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5)
    # the test split: the standard observations, standardised
    t_test, x_test = dm.splits["test"].tensors
    ref = dm.posterior_reference
    assert torch.allclose(dm.unstandardize_theta(t_test), ref.true_parameters, atol=1e-6)
    assert torch.allclose(dm.standardize_x(ref.observations), x_test)
    assert dm.theta_log_det() == pytest.approx(float(dm.theta_std.log().sum()))
    # seeded: the same seed, the same simulations; another seed, others
    again = SBIDataModule(task="gaussian_linear", num_simulations=1000, num_observations=2, data_dir=str(tmp_path))
    again.setup()
    assert torch.equal(again.splits["train"].tensors[0], theta)
    other = SBIDataModule(task="gaussian_linear", num_simulations=1000, num_observations=2, seed=1)
    other.setup()
    assert not torch.equal(other.splits["train"].tensors[0], theta)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"task": "lotka_volterra"}, "dataset.task must be one of"),
        ({"num_simulations": 0}, "num_simulations must be a positive integer"),
        ({"num_simulations": "1000"}, "num_simulations must be a positive integer"),
        ({"num_simulations": 2}, "fewer than 2 training simulations"),
        ({"num_observations": 11}, "at most 10"),
        ({"num_posterior_samples": -1}, "num_posterior_samples"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"shape": [3]}, "does not match task"),
        ({"context": {"features": 3}}, "does not match task"),
        ({"num_levels": 256}, "continuous vectors"),
    ],
)
def test_data_module_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SBIDataModule(**kwargs)


def test_the_config_makes_the_model_conditional_on_x():
    from omegaconf import OmegaConf

    for task in ("slcp", "two_moons"):
        cfg = compose(["dataset=sbi", f"dataset.task={task}", "model=maf"])
        t = make_task(task)
        assert list(cfg.dataset.shape) == [t.dim_theta]
        assert OmegaConf.to_container(cfg.model, resolve=True)["context"] == {"features": t.dim_x}


# ----------------------------------------------------------------------------- NPE end to end


@pytest.mark.slow
def test_npe_on_gaussian_linear_reaches_c2st_0_6(tmp_path):
    """Amortised NPE with a conditional MAF (5 MADE layers of 50 units, sbi's MAF size) on gaussian_linear at 10000
    simulations, trained 5 epochs (batch 50, Adam 5e-4): the C2ST of 250 posterior samples against 250 exact
    posterior samples, for 2 of the 10 observations, is <= 0.6 (chance is 0.5, the standard error of one C2ST at
    this size about 0.022; three seeds of this setting gave 0.523, 0.556 and 0.515).  Also: the per-observation
    and mean C2ST are logged, the pair plot is written and ``test/theta_nll`` is ``test/nll`` (standardised units)
    plus the standardisation's log-det.  About 14 s on one core."""
    from functools import partial

    import pytorch_lightning as pl

    from flowforge.experiment import instantiate
    from flowforge.training.module import FlowModule
    from flowforge.training.posterior_checks import PosteriorChecks

    cfg = compose(
        [
            "dataset=sbi",
            "dataset.task=gaussian_linear",
            "dataset.num_simulations=10000",
            "dataset.num_observations=2",
            "dataset.num_posterior_samples=250",
            f"dataset.data_dir={tmp_path / 'no_files'}",
            "dataset.batch_size=50",
            "model=maf",
            "model.num_layers=5",
            "model.hidden=[50]",
        ]
    )
    dm, flow = instantiate(cfg.dataset), instantiate(cfg.model)
    assert flow.conditional
    checks = PosteriorChecks(tmp_path / "figures")
    module = FlowModule(flow, optimizer=partial(torch.optim.Adam, lr=5e-4), callbacks=[checks])
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=5.0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert dm.posterior_reference.source == "closed form"
    assert m["test/c2st"] == pytest.approx((m["test/c2st/obs_1"] + m["test/c2st/obs_2"]) / 2)
    assert 0.45 <= m["test/c2st"] <= 0.6, m
    assert m["test/theta_nll"] == pytest.approx(m["test/nll"] + dm.theta_log_det(), abs=1e-4)
    assert [p.name for p in checks.paths] == ["posterior_obs1.png"] and checks.paths[0].stat().st_size > 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_npe_recipes_compose_into_conditional_models(task):
    from flowforge.experiment import instantiate

    cfg = compose([f"experiment=npe_{task}"])
    t = make_task(task)
    assert cfg.dataset.task == task and cfg.dataset.batch_size == 200 and cfg.model.num_steps == 5
    flow = instantiate(cfg.model)
    assert flow.conditional and flow.data_shape == (t.dim_theta,) and flow.context.raw_shape == (t.dim_x,)
    dm = instantiate(cfg.dataset)
    assert dm.task.name == task and dm.num_simulations == 10000


@pytest.mark.slow
def test_npe_run_reads_reference_files_and_logs_c2st(tmp_path):
    """train.py's path on a smoke-sized npe_two_moons run: the reference files (written in sbibm's format) are read,
    test/c2st per observation and their mean are logged and written to metrics.json, the pair plot is drawn."""
    import json

    from flowforge import experiment

    _write_task_files(tmp_path / "data", make_task("two_moons"), num_observations=2)
    cfg = compose(
        [
            "experiment=npe_two_moons",
            "smoke=true",
            f"dataset.data_dir={tmp_path / 'data'}",
            "dataset.num_observations=2",
            f"paths.output_dir={tmp_path / 'run'}",
            "logger=csv",
        ]
    )
    metrics = experiment.train(cfg)
    assert metrics["test/c2st"] == pytest.approx((metrics["test/c2st/obs_1"] + metrics["test/c2st/obs_2"]) / 2)
    assert all(0.0 <= metrics[f"test/c2st/obs_{k}"] <= 1.0 for k in (1, 2))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/c2st"] == metrics["test/c2st"]
    assert (tmp_path / "run" / "figures" / "posterior_obs1.png").is_file()


def test_posterior_samples_outside_the_prior_are_redrawn():
    """PosteriorChecks keeps the samples inside the prior's support (two_moons: the box [-1, 1]^2), redrawing the
    rest; after its last round it keeps what it has."""
    from flowforge.training.posterior_checks import PosteriorChecks

    dm = SBIDataModule(task="two_moons", num_simulations=100)
    dm.theta_mean, dm.theta_std, dm.x_mean, dm.x_std = torch.zeros(2), torch.ones(2), torch.zeros(2), torch.ones(2)

    class Wide(torch.nn.Module):  # a "posterior" N(0, 1.5^2 I): about 50% of its draws fall outside the box
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def sample(self, n, context=None):
            assert context.shape == (2,)
            return 1.5 * torch.randn(n, 2)

    samples = PosteriorChecks(max_rounds=50).posterior_samples(Wide(), dm, torch.zeros(2), 400)
    assert samples.shape == (400, 2) and dm.task.in_support(samples).all()
    kept = PosteriorChecks(max_rounds=1).posterior_samples(Wide(), dm, torch.zeros(2), 400)
    assert kept.shape == (400, 2) and not dm.task.in_support(kept).all()


def test_restore_best_weights_returns_to_the_best_validation_epoch(tmp_path):
    """After training, the module holds the weights of the epoch with the lowest val/loss (checked by recomputing the
    validation loss), not the last ones."""
    import pytorch_lightning as pl

    from flowforge.training.best_weights import RestoreBestWeights

    class Recorder(pl.Callback):
        def __init__(self):
            self.losses, self.states = [], []

        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:
                self.losses.append(float(trainer.callback_metrics["val/loss"]))
                self.states.append({k: v.clone() for k, v in module.state_dict().items()})

    from functools import partial

    from flowforge.experiment import instantiate
    from flowforge.training.module import FlowModule

    cfg = compose(["dataset=sbi", "dataset.task=two_moons", "model=maf", "model.hidden=[16]", "model.num_layers=2"])
    dm = SBIDataModule(task="gaussian_mixture", num_simulations=300, num_observations=1, batch_size=20)
    flow = instantiate(cfg.model)  # (two_moons and gaussian_mixture both have 2 parameters and 2 data)
    best, record = RestoreBestWeights(), Recorder()
    # a learning rate high enough that the validation loss goes up and down
    module = FlowModule(flow, optimizer=partial(torch.optim.Adam, lr=0.05), callbacks=[])
    trainer = pl.Trainer(
        max_epochs=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[record, best],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    k = min(range(len(record.losses)), key=record.losses.__getitem__)
    assert k < len(record.losses) - 1  # the premise: the last epoch is not the best (seeded)
    assert best.best_epoch == k and best.best == pytest.approx(record.losses[k])
    state = module.state_dict()
    assert all(torch.equal(state[name], record.states[k][name]) for name in state)
    with pytest.raises(ConfigError, match="min or max"):
        RestoreBestWeights(mode="lowest")
