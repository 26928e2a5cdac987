"""What a run folder says about its run: the folder's name, ``status.json``, the config tree, the parameter count.

``status.json`` in every run folder of ``train.py``, ``eval.py`` and ``sample.py`` holds ``{"status": ...}`` with
one of ``running`` (written at start), ``finished`` (with ``"metrics"``: the path of metrics.json, when there is
one), ``failed`` (with ``"error"``: the exception's type and ``"message"``) or ``stopped`` (SIGTERM, exit 143).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

STATUS_FILE = "status.json"

#: longest overrides part of a run folder's name; longer ones end in a short hash of the full text
MAX_NAME = 80


def overrides_name(overrides: str, limit: int = MAX_NAME) -> str:
    """A folder-name part for Hydra's ``job.override_dirname`` (written ``model-glow+dataset-digits``: ``-`` between
    key and value, ``+`` between overrides, so the folder's path can itself be passed as an override value such as
    ``ckpt_path=...`` or ``hydra.run.dir=...``).  Characters other than letters, digits and ``.+-_@`` become ``-``;
    beyond ``limit`` characters the text is cut and ``+`` and an 8-character hash of the whole are appended, so
    distinct override lists keep distinct names."""
    safe = re.sub(r"[^A-Za-z0-9.+\-_@]+", "-", overrides).strip("-.+")
    if len(safe) <= limit:
        return safe
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:8]
    return f"{safe[: limit - 9].rstrip('-.+')}+{digest}"


def run_name(run_id: str, overrides: str | None = None) -> str:
    """``<run_id>_<overrides>``, or the bare ``run_id`` when there are no overrides or the id is a SLURM job's
    (``slurm-...``: a requeued job must find its own folder again, whatever its command line)."""
    name = overrides_name(overrides or "")
    if not name or run_id.startswith("slurm-"):
        return run_id
    return f"{run_id}_{name}"


def job_name(num: Any, overrides: str | None = None) -> str:
    """A multirun job's subfolder: ``<job number>_<overrides>``."""
    name = overrides_name(overrides or "")
    return f"{num}_{name}" if name else str(num)


def write_status(out_dir: Path, status: str, **fields: Any) -> Path:
    """Write ``status.json`` atomically (a temporary file renamed over it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / STATUS_FILE
    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_status(out_dir: Path) -> dict | None:
    """The run's ``status.json`` as a dict (None when absent)."""
    path = Path(out_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) number of parameter elements of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def config_tree(cfg: DictConfig) -> str:
    """The composed config as text: a ``rich`` tree with one branch per top-level group (YAML without ``rich``)."""
    try:
        from rich.console import Console
        from rich.text import Text
        from rich.tree import Tree
    except ImportError:
        return _yaml(cfg)
    tree = Tree("config")
    for key in cfg:
        value = cfg._get_node(key)
        if OmegaConf.is_config(value):  # (plain text: the console has no colours, and highlighting cost 0.14 s a run)
            tree.add(str(key)).add(Text(_yaml(value).rstrip()))
        else:
            tree.add(f"{key}: {_yaml(OmegaConf.create({'v': value}))[3:].strip()}")
    buffer = io.StringIO()
    Console(file=buffer, width=120, color_system=None, force_terminal=False).print(tree)
    return buffer.getvalue()


def _yaml(node: Any) -> str:
    """YAML of a config node with its interpolations resolved where they can be (as written where not)."""
    try:
        return OmegaConf.to_yaml(node, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation is shown as written
        return OmegaConf.to_yaml(node, resolve=False)


class _DropMessages(logging.Filter):
    """Drop log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


#: Lightning's advertisement for its cloud logger, printed at the start of every run
_LIGHTNING_TIPS = _DropMessages("💡 Tip: For seamless cloud logging")


def quiet_known_noise() -> None:
    """Silence third-party messages that say nothing about a flowforge run, each narrowly by message and origin:
    Lightning's litlogger tip, and torch's ``LeafSpec`` deprecation raised inside Lightning's own pytree helper."""
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _LIGHTNING_TIPS not in rank_zero.filters:
        rank_zero.addFilter(_LIGHTNING_TIPS)
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", module=r"pytorch_lightning\.utilities"
    )


def log_to_files(logger: logging.Logger, message: str) -> None:
    """Write an INFO ``message`` to the log files (Hydra's ``<task_name>.log``) that ``logger`` reaches, without
    repeating it on the console (where it is printed)."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        current = current.parent if current.propagate else None


def is_rank_zero() -> bool:
    """True in the launching process (rank 0 of a DDP run, also under SLURM's one task per device, or a
    single-process run)."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(k, "0").strip() in ("", "0") for k in keys)
