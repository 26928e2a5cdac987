"""Exact resume: a run killed at a random step and resumed from its last checkpoint ends where the
uninterrupted run ends, bit for bit.

Each kill is real: ``train.py`` runs in a subprocess and receives SIGKILL (no chance to save), SIGTERM (saves
``last.ckpt`` at the end of the batch) or, under a simulated SLURM allocation, SIGUSR1 (Lightning's HPC
checkpoint and ``scontrol requeue``; the requeued job is the same command).  The two model configurations
between them exercise every piece of state a resume must restore: Adam moments, EMA weights, the warm-up LR
schedule, the roulette draws and dequantisation noise (global RNG), the data position (shuffled order and
random flips), spectral-norm ``u, v, sigma`` and their power-iteration subspaces, and ActNorm's
data-dependent initialisation flags.  Compared: the final checkpoint's weights, EMA weights, optimizer and
scheduler states and power-iteration subspaces, and the validation and test metrics; tolerance 0 (CPU).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import forked
import pytest
import torch

from flowforge.data.sampler import ResumableSampler
from flowforge.training.checkpoint_io import atomic_torch_save, remove_partial_files

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "trainer.max_epochs=3",
    "checkpoint_every_n_steps=4",
    "optim.warmup_steps=10",
    "callbacks.sample_figures.every_n_epochs=100",
]
CONFIGS = {
    # spectral norms + subspaces, ActNorm init, roulette estimator, EMA, warm-up; 6 steps per epoch
    "resflow": [
        "model=resflow",
        "dataset=toy2d",
        "dataset.n_train=600",
        "dataset.n_val=200",
        "dataset.n_test=200",
        "dataset.batch_size=100",
        "dataset.eval_batch_size=200",
        "model.num_blocks=3",
        "model.hidden=[16]",
        "estimator=roulette",
    ],
    # images: dequantisation noise, random flips, Glow's ActNorm; 6 steps per epoch
    "glow": [
        "model=glow",
        "dataset=digits",
        "+dataset.limit=300",
        "dataset.batch_size=50",
        "+dataset.flip=true",
        "model.num_steps=2",
        "model.hidden=[16]",
        "model.channels=8",
    ],
}
STEPS = 18  # 3 epochs x 6 steps
STATE_KEYS = (
    "state_dict",
    "current_model_state",
    "averaging_state",
    "optimizer_states",
    "lr_schedulers",
    "lipschitz_subspaces",
    "global_step",
    "epoch",
)


def train(run_dir: Path, config: str, *extra: str, env: dict | None = None, wait: bool = True):
    cmd = ["train.py", *CONFIGS[config], *COMMON, *extra]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return forked.start(cmd, cwd=ROOT, env=full_env)
    p = forked.run(cmd, cwd=ROOT, env=full_env, timeout=300)
    return p.returncode, p.stdout + p.stderr


def deviation(a, b, path="") -> float:
    """Largest absolute difference between two checkpoint structures (inf when they differ in structure)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        return 0.0 if a.numel() == 0 else float((a.double() - b.double()).abs().max())
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return float("inf")
        return max([deviation(a[k], b[k], f"{path}/{k}") for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return float("inf")
        return max([deviation(x, y) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def compare_runs(reference: Path, resumed: Path) -> dict[str, float]:
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    devs = {k: deviation(a.get(k), b.get(k)) for k in STATE_KEYS}
    ma = json.loads((reference / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    # (a run killed during its final test has nothing left to validate when resumed: its val/ keys are absent)
    metrics = [k for k in ma if k.startswith(("val/", "test/")) and k in mb]
    assert [k for k in metrics if k.startswith("test/")], mb
    for k in metrics:
        devs[k] = abs(ma[k] - mb[k])
    return devs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each configuration (run once, lazily)."""
    runs = {}

    def get(config: str) -> Path:
        if config not in runs:
            d = tmp_path_factory.mktemp(f"reference_{config}")
            code, out = train(d, config)
            assert code == 0, out[-3000:]
            assert torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
            runs[config] = d
        return runs[config]

    return get


# kill steps drawn once from a fixed seed: mid-epoch, at an epoch boundary, right after a periodic checkpoint;
# step 13 resumes from the end of epoch 2, where an extra (sanity) validation on resume changed the EMA weights'
# power-iteration state and so the result (resumed fits skip the sanity validation)
_rng = random.Random(7)
KILLS = [
    ("resflow", "SIGKILL", _rng.randrange(5, 17)),
    ("resflow", "SIGTERM", _rng.randrange(1, 17)),
    ("resflow", "SIGKILL", 6),
    ("resflow", "SIGKILL", 13),
    ("glow", "SIGKILL", _rng.randrange(5, 17)),
    ("glow", "SIGTERM", 12),
]


@pytest.mark.parametrize("config,sig,step", KILLS, ids=[f"{c}-{s}-step{k}" for c, s, k in KILLS])
def test_killed_run_resumes_bit_exactly(tmp_path, reference, config, sig, step):
    run = tmp_path / "run"
    code, out = train(run, config, f"+faults.signal={sig}", f"+faults.signal_at_step={step}")
    last = run / "checkpoints" / "last.ckpt"
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL, out[-2000:]
        # the newest save before the kill: periodic (every 4 steps) or end of epoch (every 6)
        assert torch.load(last, weights_only=False)["global_step"] == max(step // 4 * 4, step // 6 * 6)
    else:  # SIGTERM: Lightning finishes the batch, last.ckpt is written there, exit status 128 + 15
        assert code == 143, out[-2000:]
        assert f"stopped by SIGTERM at step {step + 1}" in out
        assert torch.load(last, weights_only=False)["global_step"] == step + 1
    assert not (run / "metrics.json").exists()
    code, out = train(run, config, "ckpt_path=last")
    assert code == 0, out[-3000:]
    devs = compare_runs(reference(config), run)
    assert max(devs.values()) == 0.0, devs


def test_kill_right_after_the_final_step_resumes_bit_exactly(tmp_path, reference):
    """With a periodic save due at the final step (every 3 steps, 18 in all), SIGKILL once that step's
    step-end hooks have run.  A save there would precede the closing validation: Lightning would resume it as a
    finished fit, skip that validation and write last.ckpt after the EMA copy, losing the raw weights.  The
    periodic save leaves an epoch's last batch to the epoch-end save, so the run resumes from step 15."""
    run = tmp_path / "run"
    every = "checkpoint_every_n_steps=3"
    code, out = train(run, "resflow", every, "+faults.signal=SIGKILL", f"+faults.signal_after_step={STEPS}")
    assert code == -signal.SIGKILL, out[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 15
    code, out = train(run, "resflow", every, "ckpt_path=last")
    assert code == 0, out[-3000:]
    devs = compare_runs(reference("resflow"), run)
    assert max(devs.values()) == 0.0, {k: v for k, v in devs.items() if v}
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/loss" in metrics, metrics  # the closing validation ran


def test_kill_at_a_random_time_resumes_bit_exactly(tmp_path, reference):
    """SIGKILL from outside at a random moment (possibly during a checkpoint write, possibly before the first
    checkpoint); ``ckpt_path=last`` resumes from whatever complete checkpoint exists, or starts afresh."""
    ref = reference("resflow")
    run = tmp_path / "run"
    proc = train(run, "resflow", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("*.ckpt")):
        time.sleep(0.05)
    time.sleep(random.Random(11).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    remaining_partial = list((run / "checkpoints").glob(".*.partial"))
    code, out = train(run, "resflow", "ckpt_path=last")
    assert code == 0, out[-3000:]
    assert not list((run / "checkpoints").glob(".*.partial"))  # a save cut short is cleaned up...
    if remaining_partial:
        assert "left by a checkpoint save that was interrupted" in out  # ...and reported
    devs = compare_runs(ref, run)
    assert max(devs.values()) == 0.0, devs


def test_slurm_preemption_requeues_and_resumes_bit_exactly(tmp_path, reference):
    """SIGUSR1 as SLURM sends it before a pre-emption: Lightning saves ``hpc_ckpt_1.ckpt`` at the end of the
    batch and runs ``scontrol requeue <job>`` (here a stub that records the call and, as SLURM does, sends
    SIGTERM to the job); the requeued job runs the very same command and resumes from the HPC checkpoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -TERM $PPID\n')
    stub.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "flowforge-test",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    command = ["+faults.signal=SIGUSR1", "+faults.signal_at_step=9", f"paths.log_dir={tmp_path / 'logs'}"]
    code, out = train(None, "resflow", *command, env=env)
    run = tmp_path / "logs" / "train" / "runs" / "slurm-4242"  # the folder is named after the job, not the time
    assert code == 143, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = run / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=False)["global_step"] == 10  # saved at the end of the signalled batch
    code, out = train(None, "resflow", *command, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert code == 0, out[-3000:]
    assert "hpc_ckpt_1.ckpt" in out  # Lightning restored from it
    assert calls.read_text().split() == ["requeue", "4242"]  # no second pre-emption
    # the pre-emption checkpoint is kept but moved aside, so that Lightning's SLURM logic cannot load it for testing
    assert not hpc.exists() and (run / "checkpoints" / "preempted-hpc_ckpt_1.ckpt").exists()
    devs = compare_runs(reference("resflow"), run)
    assert max(devs.values()) == 0.0, devs


def test_resuming_a_finished_run_tests_the_same_weights(tmp_path, reference):
    """A run killed during its final test resumes into a fit loop that has nothing left to do (Lightning then
    skips its hooks, the EMA copy included): the test must still use the checkpoint's evaluation weights."""
    ref = reference("resflow")
    code, out = train(tmp_path / "run", "resflow", f"ckpt_path={ref / 'checkpoints' / 'last.ckpt'}")
    assert code == 0, out[-3000:]
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert b["test/nll"] == a["test/nll"]


def test_ckpt_path_last_without_checkpoint_starts_fresh(tmp_path):
    from omegaconf import OmegaConf

    from flowforge.experiment import resolve_ckpt_path

    cfg = OmegaConf.create({"ckpt_path": "last", "paths": {"output_dir": str(tmp_path)}})
    assert resolve_ckpt_path(cfg) is None
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "last.ckpt")
    time.sleep(0.01)
    torch.save({}, tmp_path / "hpc_ckpt_2.ckpt")
    assert resolve_ckpt_path(cfg) == str(tmp_path / "hpc_ckpt_2.ckpt")  # the newest of the two kinds


# ---------------------------------------------------------------------------------------------- atomic saves
def _half_written_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 truncated")
    raise OSError("disk full (simulated)")


def test_atomic_save_never_leaves_a_truncated_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(torch, "save", _half_written_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1  # the previous complete file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # and no temporary file


def test_process_killed_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of writing the new file: the old one is intact; the leftover partial file is
    what the next run removes."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    script = (
        "import os, signal, torch\n"
        "from flowforge.training.checkpoint_io import atomic_torch_save\n"
        "def save(obj, f, *a, **k):\n"
        "    f.write(b'x' * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = save\n"
        f"atomic_torch_save({{'step': 2}}, {str(path)!r})\n"
    )
    p = forked.run(["-c", script], timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=False)["step"] == 1
    partial = list(tmp_path.glob(".*.partial"))
    assert len(partial) == 1
    assert remove_partial_files(tmp_path) == partial and not list(tmp_path.glob(".*.partial"))


# ---------------------------------------------------------------------------------------------- data position
def test_sampler_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableSampler(100, seed=3), ResumableSampler(100, seed=3)
    for epoch in (0, 5):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        torch.rand(10)  # consuming global random numbers changes nothing
        assert list(a) == list(b)
    a.set_epoch(0)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert sorted(a) == list(range(100))


def test_sampler_resumes_inside_an_epoch_and_only_there():
    full = ResumableSampler(50, seed=1, mirrored=True)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(50, seed=1, mirrored=True)
    resumed.resume_at(2, 20)
    resumed.set_epoch(2)
    assert list(resumed) == order[20:]
    resumed.set_epoch(2)
    assert list(resumed) == order  # the skip applies once
    other = ResumableSampler(50, seed=1)
    other.resume_at(1, 20)
    other.set_epoch(2)
    assert len(list(other)) == 50  # a position saved in another epoch is not applied


def test_mirrored_sampler_picks_one_side_per_example():
    s = ResumableSampler(200, seed=0, mirrored=True)
    s.set_epoch(0)
    idx = list(s)
    assert sorted(i % 200 for i in idx) == list(range(200))  # each example once, on one side
    flipped = sum(i >= 200 for i in idx)
    assert 70 < flipped < 130  # about half (binomial(200, 1/2): +-4.2 sd)
    s.set_epoch(1)
    assert [i >= 200 for i in s] != [i >= 200 for i in idx]


def test_ddp_ranks_split_each_epoch_without_overlap():
    ranks = [ResumableSampler(103, num_replicas=2, rank=r, seed=4) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(3)
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == 52  # padded to equal length, as DistributedSampler does
    assert set(parts[0]) | set(parts[1]) == set(range(103))


def test_sigterm_during_the_final_test_exits_143_with_the_way_on(tmp_path, monkeypatch, capsys):
    """Lightning's SIGTERMException is a SystemExit without a code: uncaught, the program ended with status 0,
    no metrics.json and no message."""
    import pytorch_lightning as pl
    from conftest import compose

    from flowforge import experiment

    class TermDuringTest(pl.Callback):
        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0:  # (Lightning raises at the next batch)
                os.kill(os.getpid(), signal.SIGTERM)

    make_trainer = experiment.make_trainer

    def with_signal(cfg, **kwargs):
        trainer = make_trainer(cfg, **kwargs)
        trainer.callbacks.append(TermDuringTest())
        return trainer

    monkeypatch.setattr(experiment, "make_trainer", with_signal)
    cfg = compose(
        [
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "trainer.max_epochs=1",
            "dataset.n_train=200",
            "dataset.n_val=100",
            "dataset.n_test=300",
            "dataset.batch_size=50",
            "dataset.eval_batch_size=100",
            "model.num_steps=2",
            "model.hidden=[8]",
            f"paths.output_dir={tmp_path}",
        ]
    )
    with pytest.raises(SystemExit) as info:
        experiment.main(experiment.train, cfg)
    assert info.value.code == 143
    assert "stopped by SIGTERM during the final test (training had finished at step 4)" in capsys.readouterr().out
    assert not (tmp_path / "metrics.json").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


# ------------------------------------------------------------------ SIGTERM in every phase (faults.signal_phase)
PHASE_RUN = [
    "dataset=toy2d",
    "dataset.n_train=200",
    "dataset.n_val=100",
    "dataset.n_test=100",
    "dataset.batch_size=50",
    "dataset.eval_batch_size=25",
    "model.hidden=[8]",
    "trainer.max_epochs=2",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_figures.every_n_epochs=100",
]


def phase_run(run_dir: Path, *extra: str) -> tuple[int, str]:
    cmd = ["train.py", *PHASE_RUN, *extra, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = forked.run(cmd, cwd=ROOT, env=env, timeout=300)
    return p.returncode, p.stdout + p.stderr


NOTHING_AFTER = "after SIGTERM: 0 training batches, 0 validation batches, 0 test batches"


@pytest.mark.parametrize(
    "phase, message",
    [
        # the sanity check has 2 batches of 25: Lightning did not check after the last one and ran a training step
        ("sanity", "stopped by SIGTERM at step 0: resume from the newest checkpoint"),
        ("validation", "stopped by SIGTERM at step 4: resume from the newest checkpoint"),
        ("test", "stopped by SIGTERM during the final test (training had finished at step 8)"),
    ],
)
def test_sigterm_in_an_evaluation_stops_at_the_next_batch(tmp_path, phase, message):
    code, out = phase_run(tmp_path, "model=realnvp", "+faults.signal=SIGTERM", f"+faults.signal_phase={phase}")
    assert code == 143, out[-3000:]
    assert NOTHING_AFTER in out  # the batch during which it came ends the phase: no further batch of any kind
    assert message in out
    assert not (tmp_path / "metrics.json").exists()
    if phase == "test":  # training had finished: the resume only tests the saved weights
        code, out = phase_run(tmp_path, "model=realnvp", "ckpt_path=last")
        assert code == 0, out[-3000:]
        assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 8


def test_sigterm_inside_a_long_step_stops_within_it_and_resumes_bit_exactly(tmp_path):
    """A CNF step is hundreds of ODE-function evaluations: the solve checks for a stop request between them, the
    interrupted step is discarded, last.ckpt holds the state after the last completed step (5), and the resumed
    run ends exactly where the uninterrupted one does."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    code, out = phase_run(ref, "model=cnf")
    assert code == 0, out[-3000:]
    code, out = phase_run(
        run, "model=cnf", "+faults.signal=SIGTERM", "+faults.signal_phase=inside_step", "+faults.signal_at_step=5"
    )
    assert code == 143, out[-3000:]
    assert NOTHING_AFTER in out
    calls = int(out.split("test batches, ")[1].split(" module calls")[0])
    assert calls < 5, out[-2000:]  # at most the rest of one velocity evaluation (a full step: hundreds)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5
    assert f"stopped by SIGTERM at step 5: saved {run / 'checkpoints' / 'last.ckpt'}" in out
    code, out = phase_run(run, "model=cnf", "ckpt_path=last")
    assert code == 0, out[-3000:]
    a = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # (train/* epoch means differ: the resumed epoch averages only the batches run after the resume)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (ref, run)]
    evaluated = [{k: v for k, v in m.items() if k.startswith(("val/", "test/"))} for m in metrics]
    assert evaluated[0] == evaluated[1] and "test/nll" in evaluated[0]


def test_a_stop_request_ends_an_ode_solve_at_its_next_evaluation():
    from flowforge import interrupt
    from flowforge.flows.cnf import CNF
    from flowforge.nn.velocity import VelocityMLP

    cnf = CNF(VelocityMLP(2, (8,), "tanh"), dim=2, adjoint=False)
    x = torch.randn(4, 2)
    evaluations = []
    cnf.velocity.register_forward_pre_hook(lambda module, args: evaluations.append(1))
    try:
        cnf(x)
        full = len(evaluations)
        assert full > 10
        evaluations.clear()
        interrupt.request_stop()
        with pytest.raises(interrupt.StopRequested):
            cnf(x)
        assert evaluations == []  # not one more velocity evaluation
    finally:
        interrupt.clear()
    cnf(x)  # cleared: solves again
