"""Early stopping's other half: at the end of training, return to the weights of the best validation score.

With early stopping after ``patience`` epochs without improvement, the last weights are ``patience`` epochs past the
best ones (and on small simulation budgets, overfitted); sbi's NPE training and the MAF paper's code test the best
ones.  :class:`RestoreBestWeights` keeps a copy of the module's state (parameters and buffers, on the CPU) whenever
the monitored validation metric improves, and loads it back when training ends, before the test.  The copy lives in
memory only: a run resumed from a checkpoint starts a new record.
"""

from __future__ import annotations

import copy
import math

import pytorch_lightning as pl

from flowforge.errors import ConfigError


class RestoreBestWeights(pl.Callback):
    """Module docstring.  ``monitor``: the validation metric (e.g. ``val/loss``); ``mode``: ``min`` or ``max``."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ConfigError(f"RestoreBestWeights.mode must be min or max, got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.state: dict | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not math.isfinite(value):
            return
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_epoch = value, trainer.current_epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(copy.deepcopy(self.state))
