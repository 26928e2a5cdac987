"""One run per folder: a run holds ``<run dir>/.flowforge.lock`` while it trains.

The lock file is created atomically (``O_CREAT | O_EXCL``) and records the holder's pid, host, command line and
SLURM job.  A second run in the same folder is refused with the holder's pid and command.  A lock whose holder is
gone (its pid no longer runs on this host, or it is an earlier incarnation of this same SLURM job, requeued) is
stale: it is taken over with a warning.  Only the global-rank-0 process of a distributed run takes the lock (the
other ranks are started by it, inside the same folder).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flowforge.errors import ConfigError

log = logging.getLogger("flowforge")

LOCK_NAME = ".flowforge.lock"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or not part of a distributed launch), from the environment."""
    return all(os.environ.get(v, "0") in ("", "0") for v in _RANK_VARIABLES)


def _me() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([sys.executable, *sys.argv]),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale(holder: dict) -> str | None:
    """Why the lock of ``holder`` is stale, or None when its run may still be going."""
    me = _me()
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] and holder["pid"] != me["pid"]:
        return f"it was taken by an earlier run of this SLURM job {me['slurm_job']} (requeued)"
    if holder.get("host") != me["host"]:
        return None  # its pid cannot be checked from here
    if holder["pid"] == me["pid"]:
        return "it was taken by this very process (an earlier run in it that did not finish)"
    return None if _pid_alive(holder["pid"]) else f"its pid {holder['pid']} no longer runs"


def acquire(folder: Path) -> Path:
    """Take the lock of ``folder`` (see the module docstring); returns the lock file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    for _ in range(10):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _handle_existing(path, folder)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_me(), f)
        return path
    raise ConfigError(
        f"could not take the lock {path} of the run directory (other runs keep taking it); "
        "use another run directory (hydra.run.dir=...)"
    )


def _handle_existing(path: Path, folder: Path) -> None:
    """Refuse a live holder; move a stale (or unreadable, half-written-and-abandoned) lock aside."""
    holder = _read(path)
    if holder is not None:
        why = _stale(holder)
        if why is None:
            raise ConfigError(
                f"the run directory {folder} is in use by another run: pid {holder['pid']} on {holder.get('host')} "
                f"({holder.get('command')}); two runs in one folder would overwrite each other's checkpoints, metrics "
                f"and figures. Use another run directory (hydra.run.dir=...), or wait for that run to end (if it is "
                f"gone, delete {path})"
            )
        log.warning("taking over the stale lock %s of pid %s (%s): %s", path, holder["pid"], holder.get("command"), why)
    elif path.exists() and not _young(path):
        log.warning("taking over the unreadable lock file %s", path)
    else:
        return  # being written right now: look again
    try:
        os.replace(path, path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}"))
    except FileNotFoundError:
        return  # someone else moved it first
    path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}").unlink(missing_ok=True)


def _young(path: Path, seconds: float = 5.0) -> bool:
    import time

    try:
        return time.time() - path.stat().st_mtime < seconds
    except FileNotFoundError:
        return False


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    holder = _read(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def run_lock(folder: Path) -> Iterator[Path | None]:
    """Hold the lock of ``folder`` for the ``with`` block (rank 0 only; other ranks get None)."""
    if not is_rank_zero():
        yield None
        return
    path = acquire(folder)
    try:
        yield path
    finally:
        release(path)
