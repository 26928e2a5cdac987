"""The command lines a user types: a multirun of train.py with every logger (W&B offline), then
eval.py and sample.py on a checkpoint it wrote; clear errors for bad command lines."""

import json
import os

import forked
import pytest
from conftest import ROOT

QUICK = [
    "dataset.n_train=1000",
    "dataset.n_val=500",
    "dataset.n_test=500",
    "dataset.batch_size=250",
    "trainer.max_epochs=2",
    "model.hidden=[16]",
]


def job(sweep, num):
    """A multirun job's folder, ``<num>_<overrides>``."""
    (found,) = sweep.glob(f"{num}_*")
    return found


def sh(*args, timeout=600):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = forked.run(args, cwd=ROOT, env=env, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweep")
    code, out = sh(
        "train.py",
        "-m",
        "model=realnvp,maf",
        "logger=many",
        "logger.wandb.log_model=true",
        *QUICK,
        f"hydra.sweep.dir={sweep}",
    )
    assert code == 0, out[-4000:]
    return sweep, out


def test_multirun_writes_one_complete_run_per_point(multirun):
    sweep, out = multirun
    for i, model in enumerate(["realnvp", "maf"]):
        run = job(sweep, i)
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["test/nll"] < 10
        assert model in (run / ".hydra" / "overrides.yaml").read_text()
        assert (run / "checkpoints" / "last.ckpt").exists()
        assert list((run / "figures").glob("*.png"))
        assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert "run directory:" in out and "figure:" in out


def test_wandb_offline_records_config_and_metrics(multirun):
    sweep, _ = multirun
    runs = list((job(sweep, 0) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # offline runs keep config, history and summary as protobuf records in run-<id>.wandb
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"flowforge.flows.realnvp.RealNVP" in record  # the resolved Hydra config
    for key in (b"test/nll", b"val/loss", b"train/loss_step", b"samples/test"):
        assert key in record, key
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))  # the density plots
    # logger.wandb.log_model=true: the checkpoints go up as a model artifact (queued offline, sent by wandb sync)
    assert b"model-" in record and b"last.ckpt" in record


def test_eval_and_sample_from_checkpoint(multirun, tmp_path):
    sweep, _ = multirun
    ckpt = job(sweep, 0) / "checkpoints" / "last.ckpt"
    code, out = sh("eval.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert code == 0, out[-3000:]
    expected = json.loads((job(sweep, 0) / "metrics.json").read_text())["test/nll"]
    assert abs(json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/nll"] - expected) < 1e-5
    assert f"run directory: {tmp_path / 'eval'}" in out
    code, out = sh(
        "sample.py",
        f"ckpt_path={ckpt}",
        "num_samples=500",
        "temperature=0.8",
        f"output_dir={tmp_path / 's'}",
        f"hydra.run.dir={tmp_path / 's'}",
    )
    assert code == 0, out[-3000:]
    assert (tmp_path / "s" / "density.png").exists() and (tmp_path / "s" / "samples.pt").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model=nosuchflow"], "Available options"),
        (["model=planar", "dataset=digits"], "acts on vector data"),
        (["dataset.batch_size=-4"], "batch_size must be a positive integer"),
        (["dataset=digits", "dataset.logit_alpha=0.7"], "logit_alpha must lie in (0, 0.5)"),
        (["dataset=mnist", "paths.data_dir=/nonexistent"], "/nonexistent"),
    ],
)
def test_bad_command_lines_give_clear_errors(args, needle, tmp_path):
    code, out = sh("train.py", *args, f"hydra.run.dir={tmp_path}", timeout=120)
    assert code != 0 and needle in out, out[-3000:]
    assert "Traceback" not in out or "Available options" in out
