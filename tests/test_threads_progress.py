"""The ``threads`` option (flowforge.threads) and logging / progress intervals scaled to the epoch
(flowforge.training.progress)."""

import csv
import os
from types import SimpleNamespace

import forked
import pytest
from conftest import ROOT
from pytorch_lightning.callbacks import TQDMProgressBar

from flowforge import threads
from flowforge.errors import ConfigError
from flowforge.training.progress import EpochIntervals, epoch_interval


def test_auto_threads_is_one_per_process_on_the_cpu_and_a_share_of_the_cores_on_a_gpu(monkeypatch):
    assert threads.resolve_threads("auto", "cpu", 2) == 1
    assert threads.resolve_threads(None, "cpu") == 1  # a config from before the option: auto
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    assert threads.resolve_threads("auto", "gpu", 1) == threads.GPU_AUTO_MAX
    assert threads.resolve_threads("auto", "gpu", 8) == 2  # 16 cores shared by 8 processes
    assert threads.resolve_threads("auto", "gpu", [0, 1, 2, 3, 4, 5, 6, 7]) == 2
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert threads.resolve_threads("auto", "gpu", 4) == 1  # never 0
    assert threads.resolve_threads(3, "cpu") == 3
    assert threads.resolve_threads("torch", "cpu") is None


@pytest.mark.parametrize("bad", [0, -3, "abc", 2.5, True])
def test_a_bad_thread_count_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match=r"threads=.* is not a thread count; use threads=auto"):
        threads.resolve_threads(bad, "cpu")


def test_set_threads_applies_the_count_and_exports_it(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"  # what DDP processes started by Lightning inherit
        threads.set_threads("torch")
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"  # left as it was
    finally:
        torch.set_num_threads(before)


def test_epoch_interval_fits_short_epochs_and_keeps_long_ones():
    assert epoch_interval(20, 19, 10) == 1
    assert epoch_interval(20, 40, 10) == 4
    assert epoch_interval(20, 781, 10) == 20
    assert epoch_interval(20, 3, 10) == 1
    assert epoch_interval(0, 19, 10) == 0  # logging switched off stays off


def test_epoch_intervals_lowers_the_trainer_and_bar_settings():
    bar = TQDMProgressBar(refresh_rate=20)
    trainer = SimpleNamespace(num_training_batches=19, accumulate_grad_batches=1, log_every_n_steps=20, callbacks=[bar])
    EpochIntervals(per_epoch=10).on_train_start(trainer, None)
    assert trainer.log_every_n_steps == 1 and bar.refresh_rate == 1
    bar = TQDMProgressBar(refresh_rate=20)
    trainer = SimpleNamespace(
        num_training_batches=400, accumulate_grad_batches=4, log_every_n_steps=20, callbacks=[bar]
    )
    EpochIntervals(per_epoch=10).on_train_start(trainer, None)
    assert trainer.log_every_n_steps == 10  # 100 optimizer steps per epoch
    assert bar.refresh_rate == 20  # the bar counts batches: 400 // 10 > 20
    with pytest.raises(ValueError, match="per_epoch"):
        EpochIntervals(per_epoch=0)


def test_a_short_epoch_logs_step_level_training_loss_with_the_chosen_threads(tmp_path):
    """19 batches per epoch (as digits at batch size 64) under the default log_every_n_steps=20: without the
    scaling metrics.csv would hold no step-level training loss."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    cmd = [
        "train.py",
        "threads=2",
        "dataset.n_train=190",
        "dataset.n_val=100",
        "dataset.n_test=100",
        "dataset.batch_size=10",
        "model.num_steps=2",
        "model.hidden=[8]",
        "trainer.max_epochs=1",
        "callbacks.sample_figures.every_n_epochs=100",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = forked.run(cmd, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "threads: 2 intra-op thread(s) per process" in (tmp_path / "train.log").read_text()
    assert "smaller than the logging interval" not in proc.stderr
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    steps = [r for r in rows if r.get("train/loss_step")]
    assert len(steps) == 19, f"expected a train/loss_step row for each of the 19 steps, got {len(steps)}"


def test_a_bad_threads_value_stops_the_run_with_the_fix(tmp_path):
    proc = forked.run(["train.py", "threads=-3", f"hydra.run.dir={tmp_path}"], cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "threads=-3 is not a thread count" in proc.stderr + proc.stdout
