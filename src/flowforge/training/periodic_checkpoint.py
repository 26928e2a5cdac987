"""``last.ckpt`` every N optimizer steps, except on an epoch's last batch.

A checkpoint written at the end of an epoch's last batch is taken before that epoch's validation and
before the epoch-end save.  Lightning resumes such a checkpoint as an epoch whose work is done: it skips
the validation that had not run yet, and when it was the run's final step it ends the fit at once, where
the save that ``ModelCheckpoint(save_last=True)`` makes on ``on_train_end`` comes after weight averaging
has copied the averaged weights over the raw ones, so the raw weights are lost.  The epoch-end save of
``last.ckpt`` (after validation) follows that batch anyway, so :class:`PeriodicCheckpoint` leaves it out;
a kill in between resumes from the previous save and repeats the same steps exactly.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(every_n_train_steps=N)`` that skips the save on the last batch of an epoch."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
