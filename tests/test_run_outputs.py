"""What a run leaves behind: a folder named after its overrides, status.json, the config tree and parameter count
at start, the summary in train.log, eval.py's own folder and metrics.json, and no known third-party noise."""

import json
import os

import forked
import pytest
from conftest import ROOT, compose

from flowforge import experiment
from flowforge.errors import ConfigError
from flowforge.run_info import overrides_name, read_status, run_name

NOISE = (
    "Tip: For seamless cloud logging",
    "LeafSpec",
    "Converting a tensor with requires_grad=True to a scalar",
)


def sh(*args, timeout=300, fork=True):
    """``python *args``; ``fork=False`` for the runs whose whole output is checked (a forked child does not print
    the import-time messages of the modules its fork server imported)."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = forked.run(args, cwd=ROOT, env=env, timeout=timeout, fork=fork)
    return proc.returncode, proc.stdout, proc.stderr


def only_run(root):
    (found,) = [p for p in root.iterdir() if p.is_dir()]
    return found


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    code, out, err = sh("train.py", "smoke=true", "trainer.max_steps=3", f"paths.log_dir={logs}", fork=False)
    assert code == 0, (out + err)[-4000:]
    return logs, only_run(logs / "train" / "runs"), out, err


def test_run_folder_is_named_after_the_overrides(tiny_run):
    _, run, _, _ = tiny_run
    # paths.log_dir says where, not what: it is left out of the name
    assert run.name.endswith("_smoke-true+trainer.max_steps-3"), run.name
    assert "log_dir" not in run.name


def test_finished_run_has_status_parameter_count_and_train_log(tiny_run):
    _, run, out, _ = tiny_run
    status = read_status(run)
    assert status["status"] == "finished" and status["metrics"] == str(run / "metrics.json")
    stored, _ = experiment.load_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    _, module = experiment.build(stored)
    count = sum(p.numel() for p in module.model.parameters())
    assert json.loads((run / "metrics.json").read_text())["num_parameters"] == count
    assert f"model parameters: {count:,}" in out
    log = (run / "train.log").read_text()
    assert f"run directory: {run}" in log and "test metrics: {'test/loss'" in log
    # the composed config, printed as a tree and saved with the run
    assert "├── dataset" in out and "├── dataset" in (run / "config_tree.txt").read_text()


def test_known_noise_is_gone(tiny_run):
    _, _, out, err = tiny_run
    for text in NOISE:
        assert text not in out + err, text


def test_cnf_run_has_no_requires_grad_warning(tmp_path):
    code, out, err = sh(
        "train.py", "experiment=ffjord_toy", "smoke=true", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"
    )
    assert code == 0, (out + err)[-4000:]
    for text in NOISE:
        assert text not in out + err, text


def test_eval_writes_its_own_folder_and_metrics(tiny_run):
    logs, run, _, _ = tiny_run
    code, out, err = sh("eval.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"paths.log_dir={logs}")
    assert code == 0, (out + err)[-4000:]
    folder = only_run(logs / "eval" / "runs")
    assert f"run directory: {folder}" in out and f"metrics: {folder / 'metrics.json'}" in out
    metrics = json.loads((folder / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    # smoke=true tests on one batch, eval.py on the whole test split: only the keys agree
    assert metrics["test/nll"] > 0 and metrics["ckpt_path"] == str(run / "checkpoints" / "last.ckpt")
    assert metrics["num_parameters"] == trained["num_parameters"]
    assert read_status(folder)["status"] == "finished"
    assert "run directory:" in (folder / "eval.log").read_text()


def test_resume_by_folder_still_works(tiny_run):
    """The folder's name is a valid override value: ckpt_path=last with hydra.run.dir=<folder> finds the run."""
    _, run, _, _ = tiny_run
    code, out, err = sh("train.py", "smoke=true", "trainer.max_steps=3", "ckpt_path=last", f"hydra.run.dir={run}")
    assert code == 0, (out + err)[-4000:]
    assert f"run directory: {run}" in out and read_status(run)["status"] == "finished"


def test_config_error_marks_the_folder_failed(tmp_path):
    code, out, err = sh(
        "train.py", "trainer.precision=16-mixed", "trainer.accelerator=cpu", f"paths.log_dir={tmp_path}"
    )
    assert code != 0
    run = only_run(tmp_path / "train" / "runs")
    assert run.name.endswith("_trainer.precision-16-mixed")
    status = read_status(run)
    assert status["status"] == "failed" and status["error"] == "ConfigError"
    assert "needs a GPU" in status["message"]
    assert "needs a GPU" in (run / "train.log").read_text()


@pytest.mark.parametrize(
    "error, state, kind",
    [(SystemExit(143), "stopped", "SIGTERM"), (RuntimeError("boom"), "failed", "RuntimeError")],
)
def test_status_records_how_a_run_ended(tmp_path, error, state, kind):
    cfg = compose([f"paths.output_dir={tmp_path}"])

    def fn(_):
        assert read_status(tmp_path)["status"] == "running"
        raise error

    with pytest.raises(type(error)):
        experiment.main(fn, cfg)
    status = read_status(tmp_path)
    assert status["status"] == state and status["error"] == kind


def test_flowforge_error_status_carries_the_message(tmp_path):
    cfg = compose([f"paths.output_dir={tmp_path}"])

    def fn(_):
        raise ConfigError("dataset.name=nope is not a dataset")

    with pytest.raises(SystemExit, match="nope"):
        experiment.main(fn, cfg)
    assert read_status(tmp_path)["message"] == "dataset.name=nope is not a dataset"


def test_folder_names_are_safe_and_bounded():
    assert overrides_name("model-glow+dataset-digits") == "model-glow+dataset-digits"
    assert overrides_name("model.hidden-[16,16]+x-a b") == "model.hidden--16-16-+x-a-b"
    assert overrides_name("a=b,c/d:e") == "a-b-c-d-e"  # no characters that Hydra overrides or paths reserve
    long_a, long_b = "model-glow+" + "a" * 300, "model-glow+" + "a" * 299 + "b"
    assert len(overrides_name(long_a)) <= 80 and overrides_name(long_a) != overrides_name(long_b)
    assert run_name("2026-01-01_00-00-00", "") == "2026-01-01_00-00-00"
    # a requeued SLURM job finds its own folder whatever its command line
    assert run_name("slurm-123", "model-glow") == "slurm-123"


@pytest.mark.parametrize("rank_var", ["LOCAL_RANK", "SLURM_PROCID"])
def test_only_rank_zero_writes_the_status(tmp_path, monkeypatch, rank_var):
    monkeypatch.setenv(rank_var, "1")
    experiment.main(lambda _: {}, compose([f"paths.output_dir={tmp_path}"]))
    assert read_status(tmp_path) is None
    monkeypatch.setenv(rank_var, "0")
    experiment.main(lambda _: {}, compose([f"paths.output_dir={tmp_path}"]))
    assert read_status(tmp_path)["status"] == "finished"
