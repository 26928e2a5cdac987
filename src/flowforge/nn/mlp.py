"""Multi-layer perceptron used as a coupling conditioner: ``h_{l+1} = a(W_l h_l + b_l)``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from flowforge.errors import ConfigError

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}


# Activations whose backward reads only their output, so they may overwrite their input.
_INPLACE_SAFE = ("relu", "elu", "leaky_relu")


def activation(name: str, inplace: bool = False) -> nn.Module:
    """Build an activation module by name (relu, elu, tanh, silu, leaky_relu).

    ``inplace`` overwrites the input where the activation's backward allows it (relu, elu, leaky_relu),
    saving one allocation of the layer's output; use it only on a fresh tensor nothing else reads,
    such as the output of the linear layer just before."""
    try:
        cls = _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown activation '{name}'; choose one of {sorted(_ACTIVATIONS)}") from None
    return cls(inplace=True) if inplace and name in _INPLACE_SAFE else cls()


class MLP(nn.Sequential):
    """``in_features -> hidden... -> out_features``; the last layer starts at zero when ``zero_last``
    so that a flow built from it starts as the identity map."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        act: str = "relu",
        zero_last: bool = True,
    ):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation(act, inplace=True)]
            width = h
        last = nn.Linear(width, out_features)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 - nn.Sequential semantics
        return super().forward(x)
