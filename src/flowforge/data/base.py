"""The data-module base class every dataset of flowforge derives from.

A data module holds three splits of tensors ``x`` (and optional integer labels ``y``). Image data are
integer-valued floats in ``[0, num_levels - 1]`` with shape ``(C, H, W)``; the model dequantises them
(see :meth:`flowforge.flows.model.Flow.bits_per_dim`). Vector data are continuous with shape ``(D,)``.
Batches are tuples ``(x,)`` or ``(x, y)``.

A conditional data module (:attr:`FlowDataModule.context`) yields ``(x, c)`` for a model of ``p(x | c)``: ``c`` is
the class label (``conditional=True`` on a labelled dataset, labels in ``[0, num_classes)``) or a context vector of
``K`` floats (``context={features: K}``, a dataset that is conditional by nature).  The contexts are checked once,
when the splits are loaded.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flowforge.checks import optional_positive_int
from flowforge.data.sampler import EvalSampler, ResumableSampler
from flowforge.errors import ConfigError, DataError
from flowforge.flows.context import parse_context

SPLITS = ("train", "val", "test")


class Mirrored(Dataset):
    """An image dataset and its mirror images: index ``i < n`` is example ``i`` as stored, ``i + n`` the same
    example flipped left-right.  :class:`flowforge.data.sampler.ResumableSampler` (``mirrored=True``) picks one
    of the two per example and epoch, which gives random flips that are reproducible and resumable."""

    def __init__(self, base: Dataset):
        self.base = base
        self.n = len(base)

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, i):
        item = self.base[i % self.n]
        if i >= self.n:
            item = (item[0].flip(-1),) + tuple(item[1:])
        return item


class FlowDataModule(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`load_splits`.

    Args:
        shape: the event shape the config promises (checked against the data).
        num_levels: number of quantisation levels of image data (None for continuous data).
        logit_alpha: the logit-transform alpha image models use (None for vector data); stored here
            so model configs can interpolate ``${dataset.logit_alpha}``.
        data_dir: folder with the dataset's files (file-backed datasets only).
        batch_size / eval_batch_size: loader batch sizes (eval defaults to batch_size).
        num_workers: DataLoader workers.
        flip: random horizontal flips of training images.
        limit: keep at most this many examples per split (for quick runs).
        conditional: yield ``(x, label)`` for a class-conditional model (labelled datasets only).
        num_classes: the number of classes of the labels (labelled datasets).
        context: ``{features: K}`` for a dataset whose examples carry a context vector of ``K`` numbers.
    """

    kind: str = "vector"  # or "image"
    #: whether the examples carry class labels (``conditional=True`` conditions on them)
    labelled: bool = False

    def __init__(
        self,
        shape: Sequence[int],
        num_levels: int | None = None,
        logit_alpha: float | None = None,
        data_dir: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        flip: bool = False,
        limit: int | None = None,
        name: str | None = None,
        seed: int = 0,
        conditional: bool = False,
        num_classes: int | None = None,
        context: Any = None,
    ):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"dataset.batch_size must be a positive integer, got {batch_size!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size <= 0):
            raise ConfigError(f"dataset.eval_batch_size must be a positive integer, got {eval_batch_size!r}")
        if logit_alpha is not None and not (0.0 < float(logit_alpha) < 0.5):
            raise ConfigError(f"dataset.logit_alpha must lie in (0, 0.5), got {logit_alpha!r}")
        optional_positive_int("dataset.limit", limit)
        if num_levels is not None and int(num_levels) < 2:
            raise ConfigError(f"dataset.num_levels must be >= 2, got {num_levels!r}")
        self.shape = tuple(int(s) for s in shape)
        self.num_levels = None if num_levels is None else int(num_levels)
        self.logit_alpha = logit_alpha
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.flip = flip
        self.limit = limit
        self.name = name
        self.seed = seed
        self.splits: dict[str, TensorDataset] = {}
        if flip and self.kind != "image":
            raise ConfigError(f"dataset.flip flips images; set it to false for vector data ({self.label})")
        self.conditional = conditional
        self.num_classes = num_classes
        self.context = self._context_spec(conditional, num_classes, context)

    def _context_spec(self, conditional: Any, num_classes: Any, context: Any) -> dict[str, int] | None:
        """What a batch's second element is for a conditional model: ``{"classes": K}``, ``{"features": K}``, or
        None (an unconditional dataset)."""
        if not isinstance(conditional, bool):
            raise ConfigError(f"dataset.conditional must be true or false, got {conditional!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ConfigError(f"dataset.num_classes must be an integer >= 2, got {num_classes!r}")
        if context is not None:
            spec = parse_context(context)
            if "features" not in spec:
                raise ConfigError(
                    f"dataset.context must be {{features: K}} (a context vector per example), got {context!r}; "
                    "class labels are dataset.conditional=true with dataset.num_classes"
                )
            return spec
        if not conditional:
            return None
        if not self.labelled:
            raise ConfigError(
                f"dataset.conditional=true conditions on class labels, but dataset '{self.label}' has none; use a "
                "labelled dataset (digits, mnist, cifar10, imagenet32/64) or a conditional one (toy2d_conditional, "
                "conditional_gaussian, sbi), or set dataset.conditional=false"
            )
        if num_classes is None:
            raise ConfigError(
                f"dataset.conditional=true needs dataset.num_classes (the number of classes of '{self.label}')"
            )
        return {"classes": num_classes}

    @property
    def label(self) -> str:
        """The dataset's name for messages."""
        return self.name or type(self).__name__

    # ----------------------------------------------------------------- for subclasses
    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Return ``{"train": (x, y), "val": (x, y), "test": (x, y)}``; ``y`` may be None."""
        raise NotImplementedError

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.load_splits()
        for split in SPLITS:
            if split not in raw:
                raise DataError(f"{type(self).__name__} produced no '{split}' split")
            x, y = raw[split]
            x = self.check(x, split)
            if self.context is not None:
                y = self.check_context(y, len(x), split)
            if self.limit is not None:
                x = x[: self.limit]
                y = None if y is None else y[: self.limit]
            if y is not None and self.context is None:
                y = torch.as_tensor(y).long()
            tensors = (x,) if y is None else (x, y)
            self.splits[split] = TensorDataset(*tensors)

    def check_context(self, c: Any, n: int, split: str) -> torch.Tensor:
        """Validate the contexts of a split of ``n`` examples: one per example; labels integers in ``[0,
        num_classes)`` (returned int64), vectors ``(n, K)`` finite (returned float32)."""
        name = self.label
        if c is None:
            raise DataError(f"dataset '{name}' is conditional, but its {split} split carries no context")
        c = torch.as_tensor(c)
        if c.shape[0] != n:
            raise DataError(
                f"dataset '{name}' is conditional, but its {split} split has {n} examples and {c.shape[0]} "
                "contexts; every example needs one"
            )
        classes = self.context.get("classes")
        if classes is not None:
            if c.dim() != 1 or c.dtype.is_floating_point or c.dtype == torch.bool or c.is_complex():
                raise DataError(
                    f"dataset '{name}': class labels must be integers, one per example; the {split} split has "
                    f"labels of dtype {c.dtype} and shape {tuple(c.shape)}"
                )
            lo, hi = int(c.min()), int(c.max())
            if lo < 0 or hi >= classes:
                raise DataError(
                    f"dataset '{name}': class labels must lie in [0, {classes}) (dataset.num_classes={classes}); "
                    f"the {split} split has labels in [{lo}, {hi}]"
                )
            return c.long()
        k = self.context["features"]
        if c.dim() != 2 or c.shape[1] != k:
            raise DataError(
                f"dataset '{name}': contexts must be vectors of {k} numbers (dataset.context.features={k}); the "
                f"{split} split has contexts of shape {tuple(c.shape)}"
            )
        c = c.to(torch.float32)
        bad = ~torch.isfinite(c)
        if bad.any():
            idx = bad.any(1).nonzero()[0].item()
            raise DataError(
                f"dataset '{name}': the {split} split has {int(bad.sum())} NaN/inf context values (first in "
                f"example {idx}); clean the data"
            )
        return c

    def check(self, x: torch.Tensor, split: str) -> torch.Tensor:
        """Validate one split: non-empty, the promised shape, finite, in range; returns float32."""
        name = self.label
        x = torch.as_tensor(x)
        if x.shape[0] == 0:
            raise DataError(f"dataset '{name}': the {split} split is empty")
        if tuple(x.shape[1:]) != self.shape:
            raise DataError(
                f"dataset '{name}': {split} examples have shape {tuple(x.shape[1:])}, but the config "
                f"says dataset.shape={list(self.shape)}; fix dataset.shape or the data files"
            )
        if not x.dtype.is_floating_point:
            x = x.float()
        else:
            x = x.to(torch.float32)
        bad = ~torch.isfinite(x)
        if bad.any():
            idx = bad.flatten(1).any(1).nonzero()[0].item()
            raise DataError(
                f"dataset '{name}': the {split} split has {int(bad.sum())} NaN/inf values "
                f"(first in example {idx}); clean the data files"
            )
        if self.num_levels is not None:
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > self.num_levels - 1 or not torch.equal(x, x.round()):
                raise DataError(
                    f"dataset '{name}': image data must be integers in [0, {self.num_levels - 1}] "
                    f"(num_levels={self.num_levels}); the {split} split has values in [{lo}, {hi}]"
                )
        return x

    def _loader(self, split: str, train: bool) -> DataLoader:
        """Training: a :class:`ResumableSampler` (an order fixed by ``seed`` and the epoch, sharded over DDP
        ranks, resumable mid-epoch; flips through :class:`Mirrored`); evaluation: the stored order, under DDP
        split over the ranks batch by batch by an :class:`EvalSampler` (every example once, no padding)."""
        if not self.splits:
            self.setup()
        data = self.splits[split]
        bs = self.batch_size if train else self.eval_batch_size
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = None
        if train:
            sampler = ResumableSampler(
                len(data), replicas, rank, shuffle=True, seed=self.order_seed, mirrored=self.flip
            )
            if self.flip:
                data = Mirrored(data)
        elif replicas > 1:
            sampler = EvalSampler(
                len(data), replicas, rank, what=f"the {split} split of dataset '{self.label}'", batch_size=bs
            )
            bs = sampler.batch_size
        return DataLoader(
            data,
            batch_size=bs,
            sampler=sampler,
            drop_last=train and len(self.splits[split]) // (sampler.num_replicas if sampler else 1) > bs,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.order_seed),
        )

    @property
    def order_seed(self) -> int:
        """Seed of the training order: the run's seed (``seed_everything`` exports it as ``PL_GLOBAL_SEED``)
        mixed with the split seed ``seed``, so a new run seed gives a new order but the same splits."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) * 7919 + self.seed

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    @property
    def dim(self) -> int:
        d = 1
        for s in self.shape:
            d *= s
        return d


def require_file(path: Path, dataset: str, how_to_get: str) -> Path:
    """Raise a :class:`DataError` naming ``path`` and how to obtain it, unless it exists."""
    path = Path(path)
    if not path.exists():
        link = broken_link(path)
        if link:
            raise DataError(f"dataset '{dataset}': expected file {path} cannot be read: {link}. {how_to_get}")
        raise DataError(f"dataset '{dataset}': expected file {path} does not exist. {how_to_get}")
    return path


def broken_link(path: Path) -> str | None:
    """When ``path`` does not resolve because it or a folder above it is a broken symbolic link: which one and why
    (a loop or a missing target); None otherwise (it simply does not exist)."""
    for p in (path, *path.parents):
        if not os.path.islink(p) or p.exists():
            continue
        try:
            p.resolve(strict=True)
        except RuntimeError:  # (how Python < 3.13 reports a loop)
            return f"{p} is a symbolic link loop; replace the link with the file or folder, or a link to it"
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{p} is a symbolic link loop; replace the link with the file or folder, or a link to it"
            return f"{p} is a symbolic link to {os.readlink(p)}, which does not exist; fix or replace the link"
    return None
