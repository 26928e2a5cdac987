"""Lightning layer: the LightningModule, callbacks and figures that wrap the math core."""

from flowforge.training.module import FlowModule

__all__ = ["FlowModule"]
