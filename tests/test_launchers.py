"""Cluster launching and hyperparameter search: ``hydra/launcher=slurm`` (submitit) and
``hydra/sweeper=optuna_search``.

No cluster is reachable here, so the SLURM launcher is checked up to the batch script: the launcher config
resolves from the run's trainer config, and submitit, given exactly the parameters Hydra's launcher hands it,
writes an ``#SBATCH`` header with those resources.  The Optuna sweep runs for real (two trials on CPU).
"""

import os

import forked
import pytest
import yaml
from conftest import ROOT
from omegaconf import OmegaConf

from flowforge.errors import ConfigError

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def hydra_node(overrides, node):
    from hydra import compose, initialize_config_dir

    import flowforge.experiment  # noqa: F401  (registers the slurm_* resolvers, as train.py does)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra[node], resolve=True)


@pytest.fixture
def sbatch_text(tmp_path, monkeypatch):
    """The batch script submitit writes for the parameters Hydra's SlurmLauncher passes it (same mapping as
    hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher.launch); a stub ``srun`` on the
    PATH stands for the cluster's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return lambda params: _sbatch_text(params, tmp_path)


def _sbatch_text(params: dict, tmp_path) -> str:
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = {k: v for k, v in params.items() if k not in ("_target_", "submitit_folder")}
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=str(tmp_path), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python train.py", "uid")


def test_slurm_launcher_takes_resources_from_the_trainer(sbatch_text):
    params = hydra_node(
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=2880",
        ],
        "launcher",
    )
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    text = sbatch_text(params)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=2880",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in text, (line, text)


def test_slurm_launcher_on_cpu_asks_for_no_gpu(sbatch_text):
    params = hydra_node(["hydra/launcher=slurm"], "launcher")  # trainer=cpu: 1 device, no GPU
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 1, None)
    assert "--gpus-per-node" not in sbatch_text(params)


def test_slurm_launcher_needs_a_gpu_count():
    with pytest.raises(Exception) as info:  # trainer=ddp uses devices=-1 ("all"), unknown at submission
        hydra_node(["hydra/launcher=slurm", "trainer=ddp"], "launcher")
    cause = info.value
    while cause.__cause__ is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    assert "needs trainer.devices as the number of GPUs per node" in str(cause)


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    out = tmp_path / "sweep"
    cmd = [
        "train.py",
        "-m",
        "hydra/sweeper=optuna_search",
        "hydra.sweeper.n_trials=2",
        "optim.optimizer.lr=tag(log, interval(1e-3, 1e-2))",
        "smoke=true",
        "model=realnvp",
        "dataset=toy2d",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={out}",
    ]
    p = forked.run(cmd, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = yaml.safe_load((out / "optimization_results.yaml").read_text())
    lr = result["best_params"]["optim.optimizer.lr"]
    assert 1e-3 <= lr <= 1e-2 and result["best_value"] < 10  # val/loss in nats of the 2-D toy
    trials = sorted(p.name for p in out.iterdir() if (p / "metrics.json").exists())
    assert [t.split("_", 1)[0] for t in trials] == ["0", "1"]  # <trial>_<overrides>: the trial's lr
    assert all("optim.optimizer.lr-" in t for t in trials), trials
