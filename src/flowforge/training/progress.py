"""Logging and progress-bar intervals that fit the epoch.

``trainer.log_every_n_steps`` and the progress bar's ``refresh_rate`` are fixed numbers of steps; on a short epoch
(19 batches of digits at batch size 64) an interval of 20 means the bar stands at 0/19 for the whole epoch and
``metrics.csv`` gets no step-level training loss at all.  :class:`EpochIntervals` lowers both, once the training
data are known, to

    interval = min(configured, max(1, steps_per_epoch // per_epoch))

so that every epoch logs and redraws about ``per_epoch`` times, and a long epoch keeps the configured interval.
Remove the callback (``~callbacks.epoch_intervals``) to use the configured numbers as they are.
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


def epoch_interval(configured: int, steps_per_epoch: int, per_epoch: int) -> int:
    """``min(configured, max(1, steps_per_epoch // per_epoch))``; a configured 0 (off) stays 0."""
    if configured <= 0:
        return configured
    return min(configured, max(1, steps_per_epoch // per_epoch))


class EpochIntervals(pl.Callback):
    """Scale ``trainer.log_every_n_steps`` and the TQDM bar's refresh rate to the epoch length (module docstring)."""

    def __init__(self, per_epoch: int = 10):
        if isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch < 1:
            raise ValueError(f"per_epoch must be a positive integer, got {per_epoch!r}")
        self.per_epoch = per_epoch
        # Lightning's advice to lower log_every_n_steps on short epochs comes before on_train_start, where this
        # callback does exactly that
        warnings.filterwarnings(
            "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches < 1:  # an iterable dataset of unknown length: keep the settings
            return
        steps = max(1, batches // max(1, trainer.accumulate_grad_batches))
        trainer.log_every_n_steps = epoch_interval(trainer.log_every_n_steps, steps, self.per_epoch)
        for bar in trainer.callbacks:
            if isinstance(bar, TQDMProgressBar):
                # TQDMProgressBar has no setter; its refresh_rate property reads this attribute
                bar._refresh_rate = epoch_interval(bar.refresh_rate, batches, self.per_epoch)
