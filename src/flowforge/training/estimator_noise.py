"""The noise a stochastic log-det estimator adds to a test-set mean.

Each test example is evaluated twice with independent estimates ``a_i`` and ``b_i``; the reported value is the
mean of the pair, whose standard deviation over a test set of ``N`` examples is

    sqrt(sum_i (a_i - b_i)^2 / 2) / (N sqrt(2))

(``(a_i - b_i)^2 / 2`` estimates the variance of one estimate of example ``i`` without bias).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class EstimatorNoise:
    """Accumulates ``[sum_i (a_i - b_i)^2 / 2, N]`` over the test batches (module docstring)."""

    def __init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64)

    def reset(self) -> None:
        self.sums.zero_()

    def pair(self, values: dict[str, Tensor], again: dict[str, Tensor]) -> dict[str, Tensor]:
        """Record the losses of two estimates of a batch; returns the mean of the pair for every value."""
        diff = (values["loss"] - again["loss"]).double()
        self.sums += torch.stack([diff.pow(2).sum().cpu() / 2, torch.tensor(float(diff.shape[0]))])
        return {k: (v + again[k]) / 2 for k, v in values.items()}

    def std(self, sums: Tensor) -> float | None:
        """The standard deviation of the mean from ``sums`` (these sums reduced over processes); None without data."""
        var_sum, n = float(sums[0]), float(sums[1])
        return math.sqrt(var_sum) / (n * math.sqrt(2)) if n > 0 else None
