"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 17 grey levels 0..16): the embedded
real dataset, no download.  Deterministic split (seeded): 1,257 train / 270 val / 270 test."""

from __future__ import annotations

import torch

from flowforge.data.base import FlowDataModule


class DigitsDataModule(FlowDataModule):
    """Labels 0-9 (``conditional=True`` for a class-conditional model)."""

    kind = "image"
    labelled = True

    def __init__(self, **kwargs):
        kwargs.setdefault("shape", [1, 8, 8])
        kwargs.setdefault("num_levels", 17)
        super().__init__(**kwargs)

    def load_splits(self):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.from_numpy(bunch.images).float().unsqueeze(1)
        y = torch.from_numpy(bunch.target).long()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        x, y = x[perm], y[perm]
        n_test = n_val = 270
        n_train = len(x) - n_val - n_test
        return {
            "train": (x[:n_train], y[:n_train]),
            "val": (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
            "test": (x[n_train + n_val :], y[n_train + n_val :]),
        }
