"""Exact resume: a run restarted from a checkpoint continues as if it had never stopped.

Lightning's checkpoint already holds the weights and buffers (spectral-norm ``u, v, sigma``, ActNorm's
``initialized`` flag), the optimizer, the LR scheduler, the loop counters and the EMA weights.  What it
leaves out is made exact here by construction rather than by saving mutable state:

- Random numbers.  Before every training batch the Python, NumPy and torch (all devices) generators are
  seeded with ``hash(seed, "train", batch index over the whole run, rank)``; before every validation and
  test batch with ``hash(seed, stage, optimizer step, batch number in the split)`` (the same under DDP as in
  one process, :func:`seed_evaluation_batch`).  Dequantisation noise, the roulette
  truncation draws and the Hutchinson probes (all drawn from torch's global generator inside the step) are
  therefore a function of the position in the run, the same in an uninterrupted and in a resumed run.
  The seed itself is stored in the checkpoint, so ``seed: null`` runs resume exactly too.
- The data position.  The training order is a function of (seed, epoch)
  (:class:`flowforge.data.sampler.ResumableSampler`); the checkpoint records the epoch and the number of
  batches already used in it, and on resume the sampler skips exactly those.
- Signals.  SIGTERM (a scheduler's kill, ``kill <pid>``) is acted on at the next batch in every phase, then
  the process exits with code 143.  In training, Lightning stops at the end of the current batch and this
  callback writes ``<checkpoints>/last.ckpt`` there (a signal that arrives between batches: at the end of the
  next one).  This callback also chains :func:`flowforge.interrupt.request_stop` to Lightning's SIGTERM
  handler, so a long single step stops inside itself (a CNF's ODE solve checks between function evaluations):
  the interrupted step is discarded and ``last.ckpt`` holds the state after the last completed step, so the
  resume stays exact.  A signal that arrives during the sanity check, a validation or a test stops it after
  the evaluation batch in progress (Lightning's own check skips an epoch's last batch; this callback does not);
  nothing is saved during an evaluation: the run resumes from the newest checkpoint (``ckpt_path=last``; from
  scratch when the sanity check was interrupted), and an interrupted final test is redone by the resume.  Only
  a validation that directly follows the batch-end save of the signal runs to its end, so that the checkpoint
  written after it (the exact resume point: a resume does not redo that validation) holds its effects.
  SLURM pre-emption: Lightning's ``SLURMEnvironment`` (auto-requeue, SIGUSR1 by default) saves
  ``hpc_ckpt_<n>.ckpt`` and calls ``scontrol requeue``; this callback defers Lightning's handler to the end
  of the batch in progress, so the state saved is never that of a half-finished step.  The requeued job
  resumes from it through Lightning (``ckpt_path=None`` on SLURM picks the newest ``hpc_ckpt``).
  SIGKILL cannot be caught: the run resumes from the newest periodic checkpoint.

All checkpoint writes are atomic (:mod:`flowforge.training.checkpoint_io`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from flowforge import interrupt
from flowforge.data.base import FlowDataModule
from flowforge.data.sampler import ResumableSampler
from flowforge.errors import ConfigError
from flowforge.training.checkpoint_io import remove_partial_files
from flowforge.training.objectives import BY_NAME

log = logging.getLogger("flowforge")


def stream_seed(seed: int, *key: Any) -> int:
    """A 63-bit seed for the random stream named by ``(seed, *key)`` (BLAKE2b of their text)."""
    text = "/".join(str(k) for k in (seed, *key)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (every device's) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_evaluation_batch(trainer: pl.Trainer, seed: int, stage: str, step: int, batch_idx: int) -> None:
    """Seed the random streams for this process's evaluation batch ``batch_idx``: by its batch number in the split
    (``batch_idx * R + rank``, the layout of :class:`flowforge.data.sampler.EvalSampler`), so every example draws the
    same evaluation noise however many processes evaluate the split."""
    seed_all(stream_seed(seed, stage, step, "batch", batch_idx * trainer.world_size + trainer.global_rank))


class EvaluationSeeds(pl.Callback):
    """The test batches' random streams of a run's final test (:func:`seed_evaluation_batch` with the run's
    ``seed`` and the checkpoint's ``step``), for testing a checkpoint outside its run (``eval.py``): the same
    weights then give the same stochastic test metrics (image data's dequantisation noise) as the run's own test."""

    def __init__(self, seed: int, step: int):
        self.seed, self.step = int(seed), int(step)

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        seed_evaluation_batch(trainer, self.seed, "test", self.step, batch_idx)


class ExactResume(pl.Callback):
    """See the module docstring.  Args: ``dirpath``: the checkpoint folder (``last.ckpt`` on SIGTERM);
    ``seed``: the run's seed (None: one is drawn and stored in the checkpoints)."""

    def __init__(self, dirpath: str, seed: int | None = None):
        self.dirpath = Path(dirpath)
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._position: tuple[int, int] | None = None  # (epoch, batches used) from a loaded checkpoint
        self._requeue: tuple[Any, int] | None = None  # (Lightning's handler, signal) waiting for a batch end
        self._handler: Any = None
        self._trainer: pl.Trainer | None = None
        self.saved_on_signal: Path | None = None
        self.trained = False  # whether the fit loop ran (it is skipped when resuming a finished run)

    @property
    def state_key(self) -> str:
        return "ExactResume"

    # ------------------------------------------------------------------ checkpoint state
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        interrupt.clear()
        if isinstance(getattr(trainer, "datamodule", None), FlowDataModule):
            # Lightning warns that a mid-epoch resume is unreliable unless the loader has a state_dict; the
            # ResumableSampler restores the position instead (on_train_start)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        if stage == "fit" and trainer.is_global_zero:
            for p in remove_partial_files(self.dirpath) + remove_partial_files(trainer.default_root_dir):
                log.warning("removed %s, left by a checkpoint save that was interrupted", p)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        interrupt.clear()  # a stop request belongs to this run: later computations in the process must not see it

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {"seed": self.seed}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"seed": self.seed, "epoch": int(trainer.current_epoch), "batches": int(progress.ready)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict["seed"])
        if "epoch" in state_dict:
            self._position = (int(state_dict["epoch"]), int(state_dict["batches"]))

    # ------------------------------------------------------------------ data position and signals
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trained = True
        _chain_stop_request(trainer)
        position, self._position = self._position, None
        if position is not None and position[1] > 0:
            loader = trainer.train_dataloader
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, ResumableSampler):
                sampler.resume_at(position[0], position[1] * loader.batch_size)
            else:
                log.warning(
                    "resuming inside epoch %d after %d batches, but the training loader's sampler (%s) cannot skip "
                    "the examples already used: this epoch starts over from its first batch (use a "
                    "flowforge.data.FlowDataModule, whose ResumableSampler restores the position)",
                    position[0],
                    position[1],
                    type(sampler).__name__,
                )
        self._defer_requeue_signal(trainer)

    def _defer_requeue_signal(self, trainer: pl.Trainer) -> None:
        env = cluster_environment(trainer)
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue) or env.requeue_signal is None:
            return
        signum = env.requeue_signal
        handler = signal.getsignal(signum)
        if not callable(handler) or getattr(handler, "__self__", None) is self:
            return

        def defer(sig, frame):
            self._requeue = (handler, sig)
            log.info("received signal %s: saving a checkpoint and requeueing at the end of this batch", sig)

        try:
            signal.signal(signum, defer)
        except ValueError:  # not the main thread
            return
        self._handler = defer

    # Lightning installs its SIGTERM handler after on_fit_start / on_test_start's setup, just before the loops run
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _chain_stop_request(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _chain_stop_request(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _chain_stop_request(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # Lightning does not check after an epoch's last batch (the sanity check's).  A validation that follows the
        # batch-end save of this signal runs to its end: the checkpoint written there (after the validation's own
        # effects on the state) is the exact resume point, since a resume does not redo that validation.
        if trainer.received_sigterm and self.saved_on_signal is None:
            raise SIGTERMException

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed_all(stream_seed(self.seed, "train", trainer.fit_loop.total_batch_idx, trainer.global_rank))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.received_sigterm and self.saved_on_signal is None:
            self._save_on_signal(trainer)  # at the batch boundary; Lightning stops after this batch
        if self._requeue is not None:
            handler, sig = self._requeue
            self._requeue = None
            handler(sig, None)  # Lightning's SLURM handler: hpc checkpoint + scontrol requeue

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        stage = "sanity" if trainer.sanity_checking else "val"
        seed_evaluation_batch(trainer, self.seed, stage, trainer.global_step, batch_idx)

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        seed_evaluation_batch(trainer, self.seed, "test", trainer.global_step, batch_idx)

    def _save_on_signal(self, trainer: pl.Trainer) -> None:
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved_on_signal = path
        log.warning("SIGTERM: saved %s at step %d; resume with ckpt_path=%s", path, trainer.global_step, path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """SIGTERM that arrived after this batch's ``on_train_batch_end``, or a stop inside a training step
        (:class:`flowforge.interrupt.StopRequested`, the unfinished batch discarded): save here when the state is
        that of a batch boundary inside an epoch.  At an epoch's end (after validation and the epoch-end hooks)
        Lightning's loop counters cannot be restored from that point; the checkpoint saved at the end of validation
        of the same step is then the exact one."""
        try:
            self._on_stop(trainer, exception)
        finally:
            interrupt.clear()  # (Lightning calls no teardown hook after an exception)

    def _on_stop(self, trainer: pl.Trainer, exception: BaseException) -> None:
        stopped = isinstance(exception, (SIGTERMException, interrupt.StopRequested))
        if not stopped or trainer.state.fn != "fit" or self.saved_on_signal:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        if not (trainer.sanity_checking or trainer.validating) and not _discard_unfinished_batch(epoch_loop):
            log.warning(
                "SIGTERM arrived as an epoch started: resume from the newest checkpoint in %s (ckpt_path=last)",
                self.dirpath,
            )
            return
        inside_epoch = epoch_loop.batch_progress.current.ready < trainer.num_training_batches
        if trainer.sanity_checking or trainer.validating or not inside_epoch:
            log.warning(
                "SIGTERM arrived during validation or at an epoch's end: resume from the newest checkpoint in %s "
                "(ckpt_path=last)",
                self.dirpath,
            )
            return
        self._save_on_signal(trainer)


def _chain_stop_request(trainer: pl.Trainer) -> None:
    """Make SIGTERM also call :func:`flowforge.interrupt.request_stop` before the handler in place (Lightning's,
    which sets ``trainer.received_sigterm``), so that long inner loops stop too.  Idempotent; Lightning's teardown
    restores the handlers it found.  Single-process runs only: under DDP the processes must leave a step together
    (one that abandoned its step would leave the others waiting in the gradient all-reduce), which Lightning's own
    check at batch ends, agreed over the ranks, ensures."""
    if trainer.world_size > 1:
        return
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "_flowforge_stop", False) or not callable(previous):
        return

    def handler(signum: int, frame: Any) -> None:
        interrupt.request_stop()
        previous(signum, frame)

    handler._flowforge_stop = True  # type: ignore[attr-defined]
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: batch-boundary stops only
        pass


def _discard_unfinished_batch(epoch_loop: Any) -> bool:
    """Set the training progress counters back to the end of the last completed batch (as a save at that batch's
    end records them), discarding a batch that was started but not processed; False when no batch of this epoch
    was completed (the state is then that of the epoch's start, which a checkpoint cannot restore exactly)."""
    progress = epoch_loop.batch_progress
    if progress.current.processed == progress.current.ready:
        return True  # no unfinished batch (the signal came at a batch end)
    if progress.current.processed < 1:
        return False
    for tracker in (progress.current, progress.total):
        tracker.ready = tracker.started = tracker.processed
        tracker.completed = tracker.processed - 1
    return True


def cluster_environment(trainer: pl.Trainer) -> Any:
    """The cluster environment the run's strategy uses (multi-device strategies), else the SLURM environment
    Lightning detects for a single-device run inside a SLURM job (None outside one)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None and SLURMEnvironment.detect():
        env = SLURMEnvironment()
    return env


def apply_resume_changes(trainer: pl.Trainer, changes: dict[str, Any]) -> None:
    """Optimizer settings changed on resume (``resume_overrides``, ``{key: new value}``): Lightning has just
    restored the old ones with the optimizer state, so set the new ones in every parameter group (a learning rate
    also as the scheduler's base rate, the warm-up factor applied)."""
    for key, value in changes.items():
        if not key.startswith("optim.optimizer.") or key.count(".") != 2:
            continue
        name = key.rsplit(".", 1)[1]
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                if name in group:
                    group[name] = tuple(value) if isinstance(group[name], tuple) else value
        if name == "lr":
            for config in trainer.lr_scheduler_configs:
                sched = config.scheduler
                sched.base_lrs = [float(value)] * len(sched.base_lrs)
                for group, fn in zip(sched.optimizer.param_groups, getattr(sched, "lr_lambdas", [])):
                    group["lr"] = float(value) * fn(sched.last_epoch)
        log.warning("resume: %s = %r applied to the optimizer", key, value)


# ---------------------------------------------------------------------------------------------- config guard
#: settings that a resume may change freely: where things go, what is logged and shown, how long to train (to
#: extend a run), fault policies and fault injection; every other difference would change the experiment
FREE_ON_RESUME = (
    "paths",
    "ckpt_path",
    "overrides",
    "tags",
    "task_name",
    "logger",
    "faults",
    "train",
    "test",
    "resume_overrides",
    "optimized_metric",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "threads",
    "compile",
    "estimator.fused",  # an implementation route: the same values and gradients
    "optim.optimizer.fused",  # an implementation route of the same update (the optimizer state is the same)
    "lipschitz_init_iters",  # acts on uninitialised layers only; a resumed model's are initialised
    "callbacks.epoch_intervals",
    "callbacks.progress_bar",
    "callbacks.sample_figures",
    "callbacks.lr_monitor",
    "callbacks.model_checkpoint",
    "callbacks.last_checkpoint",
    "checkpoint_every_n_steps",
    "on_nonfinite",
    "on_solver_failure",
    "on_power_iteration_failure",
    "fault_lr_factor",
    "max_fault_events",
    "dataset.data_dir",
    "dataset.num_workers",
    "trainer.default_root_dir",
    "callbacks.exact_resume.dirpath",
)
#: settings no resume may change, even on request: the random streams, the data and the architecture
FIXED_ON_RESUME = ("seed", "dataset", "model")
_ABSENT = "<absent>"


def with_objective_target(config: dict) -> dict:
    """``config`` with the ``_target_`` of its objective filled in from the objective's name, as configurations
    stored before objectives had one lack it."""
    objective = config.get("objective")
    if not isinstance(objective, dict) or "_target_" in objective:
        return config
    cls = BY_NAME.get(objective.get("name", "mle"))
    target = f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}" if cls else None
    return {**config, "objective": {"_target_": target, **objective}}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_differences(stored: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, new value)`` for every setting outside :data:`FREE_ON_RESUME` that differs."""
    a, b = _flatten(with_objective_target(stored)), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if not _under(k, FREE_ON_RESUME))
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def check_resume_config(stored: dict, new: dict, ckpt_path: str, allowed: list[str]) -> dict[str, Any]:
    """Refuse a resume whose configuration differs from the checkpoint's run in a setting that breaks exactness,
    unless the key is listed in ``allowed`` (``resume_overrides``); returns the accepted changes ``{key: new}``."""
    unknown = [k for k in allowed if _under(k, FIXED_ON_RESUME)]
    if unknown:
        raise ConfigError(
            f"resume_overrides={list(allowed)} names {unknown}, but the seed, the data (dataset.*) and the "
            f"architecture (model.*) cannot change on resume: the checkpoint's random streams, data position and "
            f"weights belong to them. Start a new run instead (no ckpt_path, another hydra.run.dir)"
        )
    differences = config_differences(stored, new)
    refused = [d for d in differences if not _under(d[0], allowed)]
    if refused:
        shown = "; ".join(f"{k}: {old!r} -> {value!r}" for k, old, value in refused)
        example = next((k for k, _, _ in refused if not _under(k, FIXED_ON_RESUME)), "optim.optimizer.lr")
        raise ConfigError(
            f"resuming from {ckpt_path} would silently change the experiment: {len(refused)} setting(s) differ from "
            f"the run that wrote it ({shown}). Resume with the original values; or start a new run (no ckpt_path, "
            f"another hydra.run.dir); or, for a deliberate change of a training setting, list it in resume_overrides, "
            f"e.g. resume_overrides=[{example}] (seed, dataset.* and model.* cannot change on resume)"
        )
    for key, old, value in differences:
        log.warning("resume: %s changed from %r to %r (resume_overrides)", key, old, value)
    return {key: value for key, _, value in differences}
