"""Neural-network building blocks used inside flows (conditioners, MADE, Lipschitz layers)."""

from flowforge.nn.convnet import ConvNet
from flowforge.nn.made import MADE
from flowforge.nn.mlp import MLP, activation

__all__ = ["ConvNet", "MADE", "MLP", "activation"]
