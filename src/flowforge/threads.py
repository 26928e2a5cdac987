"""CPU threads of a run: the ``threads`` option of ``train.py``, ``eval.py`` and ``sample.py``.

torch starts one intra-op thread per core.  For the small models and batches that train on a CPU this is the
slowest choice on a machine that other jobs share: every operation is split across all threads and waits for the
slowest, so a thread the operating system deschedules stalls the whole step.  On a 2-core machine with two other
busy processes, three epochs of a small Glow on digits took 15 s with one thread and 100 s with two.

``threads``:

* ``auto`` (default): one thread per process when training on the CPU; on a GPU (where the CPU only feeds the
  device) ``min(4, cores // processes per node)``.
* a positive integer: that many threads per process.
* ``torch``: torch's own default (one per core), untouched.

The choice is also written to ``OMP_NUM_THREADS``, which DDP processes started by Lightning inherit (Lightning
only picks its own count when that variable is unset).  Data-loader worker processes run one thread each (torch's
default for workers).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from flowforge.errors import ConfigError

log = logging.getLogger("flowforge")

#: most intra-op threads ``threads=auto`` gives a GPU run's process
GPU_AUTO_MAX = 4


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a scheduler such as SLURM restricts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _uses_gpu(accelerator: Any) -> bool:
    accelerator = str(accelerator or "auto")
    if accelerator == "cpu":
        return False
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def _processes_per_node(devices: Any, gpu: bool) -> int:
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)) and devices:
        return len(devices)
    if gpu and (devices == -1 or devices in ("-1", "auto")):
        return max(1, torch.cuda.device_count())
    return 1


def resolve_threads(value: Any, accelerator: Any = "cpu", devices: Any = 1) -> int | None:
    """Number of intra-op threads per process for ``threads=value`` (None: leave torch's default)."""
    if value == "torch":
        return None
    if value is None or value == "auto":
        gpu = _uses_gpu(accelerator)
        if not gpu:
            return 1
        return max(1, min(GPU_AUTO_MAX, available_cores() // _processes_per_node(devices, gpu)))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"threads={value!r} is not a thread count; use threads=auto (one per process on the CPU, up to "
            f"{GPU_AUTO_MAX} on a GPU), a positive integer such as threads=4, or threads=torch (one per core)"
        )
    return value


def set_threads(value: Any, accelerator: Any = "cpu", devices: Any = 1) -> int:
    """Apply ``threads=value`` to this process (and, through ``OMP_NUM_THREADS``, to the processes it starts);
    returns the number of intra-op threads now in use."""
    n = resolve_threads(value, accelerator, devices)
    if n is not None:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
    used = torch.get_num_threads()
    log.info(
        "threads: %d intra-op thread(s) per process (threads=%s, %d cores available)", used, value, available_cores()
    )
    return used
