"""Log-determinant estimators for residual-type flows: exact, truncated and Russian-roulette power
series with Hutchinson probes, the Neumann gradient series and backward-in-forward."""

from flowforge.estimators.hutchinson import sample_probe
from flowforge.estimators.logdet import ESTIMATORS, LogDetEstimator
from flowforge.estimators.roulette import RouletteDistribution

__all__ = ["ESTIMATORS", "LogDetEstimator", "RouletteDistribution", "sample_probe"]
