"""One run per folder: a second run in a run directory that is in use is refused with the holder's pid and command;
a stale lock (its process gone, or an earlier incarnation of the same SLURM job) is taken over with a warning."""

import json
import os
import signal
import subprocess
import sys
import time

import forked
import pytest
from conftest import ROOT, compose
from test_bad_inputs import QUICK_TRAIN, _fill, _write_lock

from flowforge import experiment
from flowforge.errors import ConfigError
from flowforge.training.run_lock import LOCK_NAME, acquire, release

SLOW = [
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "trainer.max_epochs=1000",
    "dataset.n_train=64",
    "dataset.n_val=16",
    "dataset.n_test=16",
    "dataset.batch_size=32",
    "model.num_steps=2",
    "model.hidden=[8]",
    "callbacks.sample_figures.every_n_epochs=10000",
]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_run_in_a_folder_in_use_is_refused(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = forked.start(["train.py", *SLOW, f"hydra.run.dir={run}"], cwd=ROOT, env=env)
    try:
        deadline = time.time() + 120
        while not (run / LOCK_NAME).exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert (run / LOCK_NAME).exists()
        second = forked.run(["train.py", *SLOW, f"hydra.run.dir={run}"], cwd=ROOT, env=env, timeout=300)
        out = second.stdout + second.stderr
        assert second.returncode != 0
        assert f"the run directory {run} is in use by another run: pid {first.pid} on" in out
        assert "train.py" in out and "Use another run directory (hydra.run.dir=...)" in out
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    assert not (run / LOCK_NAME).exists()  # released at exit


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path / "run", dead)
    experiment.train(compose(_fill(QUICK_TRAIN, tmp_path)))
    assert f"taking over the stale lock {tmp_path / 'run' / LOCK_NAME} of pid {dead}" in caplog.text
    assert f"its pid {dead} no longer runs" in caplog.text
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch, caplog):
    _write_lock(tmp_path, 12345, host="node-that-ran-it-before", slurm_job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    path = acquire(tmp_path)
    assert "an earlier run of this SLURM job 777 (requeued)" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)
    assert not path.exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _write_lock(tmp_path, 12345, host="another-node", command="python train.py model=glow")
    with pytest.raises(
        ConfigError,
        match=r"in use by another run: pid 12345 on another-node \(python train\.py "
        r"model=glow\).*if it is gone, delete \S+\.flowforge\.lock",
    ):
        acquire(tmp_path)
