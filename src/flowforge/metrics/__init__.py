"""Metrics of a trained model against reference samples."""

from flowforge.metrics.c2st import c2st

__all__ = ["c2st"]
