"""Checkpoints that are never half-written.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp
folder; when that is another file system the final move is a copy, and a crash during the copy leaves a
truncated ``last.ckpt``.  :class:`AtomicCheckpointIO` writes ``<dir>/.<name>.<pid>.partial`` next to the
target, flushes and ``fsync``s it, renames it over the target with ``os.replace`` (atomic within one file
system, POSIX and Windows) and ``fsync``s the folder, so a reader sees either the previous complete file or
the new complete file.  A crash leaves at most a ``.partial`` file, which the next run removes
(:func:`remove_partial_files`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"


def atomic_torch_save(obj: Any, path: os.PathLike | str) -> None:
    """``torch.save(obj, path)`` through a same-folder temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_files(folder: os.PathLike | str) -> list[Path]:
    """Delete the ``.partial`` files a crashed save left in ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".*{PARTIAL_SUFFIX}"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O plugin that saves with :func:`atomic_torch_save` (local paths; remote URLs
    fall back to Lightning's transaction) and loads with ``weights_only=True`` whatever the caller asks: every
    resume Lightning performs (``trainer.fit(ckpt_path=...)``, SLURM's ``hpc_ckpt``) reads tensors and plain data
    only, never objects that run code."""

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        if "://" in str(path):
            return super().load_checkpoint(
                path, map_location=map_location or (lambda storage, loc: storage), weights_only=True
            )
        from flowforge.trust import load_torch_file

        return load_torch_file(Path(path), map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
