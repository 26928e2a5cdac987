"""When i-DenseNet's concatenation weights start learning (Perugachi-Diaz et al., 2021).

The dense layers' weights ``K`` of ``[eta_1 x, eta_2 h(x)]`` are held fixed for the first
``start_epoch`` epochs and trained afterwards (25 for MNIST / CIFAR-10, 0 for ImageNet in the paper).
The flag is set at the start of every training epoch from the epoch number, so a resumed run gets it
right without storing it.
"""

from __future__ import annotations

import pytorch_lightning as pl

from flowforge.errors import ConfigError
from flowforge.nn.densenet import set_concat_weights_learnable


class LearnableConcatFrom(pl.Callback):
    def __init__(self, start_epoch: int = 25):
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ConfigError(f"start_epoch must be an integer >= 0, got {start_epoch!r}")
        self.start_epoch = start_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_concat_weights_learnable(pl_module, trainer.current_epoch >= self.start_epoch)
