"""Classifier two-sample test (C2ST; Lopez-Paz & Oquab, 2017), as the sbibm benchmark computes it.

Given samples ``X ~ P`` (the reference) and ``Y ~ Q`` (the model), both are z-scored with the mean and standard
deviation of ``X``, a classifier is trained to tell them apart, and the score is its K-fold cross-validated accuracy

    C2ST = 1/K sum_k  mean_{i in fold k} [ classifier_k(s_i) = label_i ],

with labels 0 for ``X`` and 1 for ``Y``.  0.5 means the classifier cannot distinguish the samples (``Q = P`` as far as
it can see), 1.0 that they are perfectly separable.  The classifier is sbibm's: scikit-learn's ``MLPClassifier``
with two hidden ReLU layers of ``10 * dim`` units, Adam, up to 10000 iterations, ``random_state=seed``; the folds
are a shuffled ``KFold(5)`` with the same seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowforge.errors import DataError


def c2st(
    reference: Tensor | np.ndarray,
    samples: Tensor | np.ndarray,
    seed: int = 1,
    folds: int = 5,
    z_score: bool = True,
    max_iter: int = 10000,
) -> float:
    """The C2ST accuracy of ``samples`` against ``reference`` (module docstring); both ``(n, dim)``."""
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    x = torch.as_tensor(reference).double()
    y = torch.as_tensor(samples).double()
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise DataError(f"c2st needs two sample sets (n, dim) of one dimension, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(len(x), len(y)) < folds:
        raise DataError(f"c2st with {folds} folds needs at least {folds} samples in each set")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise DataError("c2st: the samples hold NaN/inf values")
    if z_score:
        mean, std = x.mean(0), x.std(0).clamp_min(1e-12)
        x, y = (x - mean) / std, (y - mean) / std
    dim = x.shape[1]
    classifier = MLPClassifier(
        activation="relu", hidden_layer_sizes=(10 * dim, 10 * dim), max_iter=max_iter, solver="adam", random_state=seed
    )
    data = torch.cat([x, y]).numpy()
    labels = np.concatenate([np.zeros(len(x)), np.ones(len(y))])
    split = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(classifier, data, labels, cv=split, scoring="accuracy")))
