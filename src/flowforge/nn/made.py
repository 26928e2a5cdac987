"""MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015).

Each weight matrix is multiplied by a binary mask so that output ``i`` depends only on inputs
that precede ``i`` in the autoregressive ``order``:  with input degrees ``m(d) = order[d]``
and hidden degrees ``m(k)``, hidden unit k sees input d iff ``m(k) >= m(d)``, and output d sees
hidden unit k iff ``m(d) > m(k)``.  The output has ``num_params`` values per input dimension,
returned with shape ``(batch, D, num_params)``.

A conditional MADE (``context_features`` F > 0; Papamakarios et al., 2017, conditional MAF) also reads context
features ``h`` ``(batch, F)``: they are inputs of degree 0, so every unit of the first hidden layer sees all of them
through an unmasked weight matrix ``V``,

    a_1 = (W_1 * M_1) x + V h + b_1,

and the outputs see ``h`` only through the hidden layers (with no hidden layer, ``V h`` is added to the outputs).
Hidden degrees then run over ``0..D-1``: a unit of degree 0 sees no x, only ``h``, so the first variable in the
order depends on the context too.  The autoregressive property in x is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.nn.mlp import activation


class MaskedLinear(nn.Linear):
    """``y = (W * M) x + b`` with a fixed binary mask ``M`` (a buffer, saved with the model)."""

    def __init__(self, mask: Tensor):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    def __init__(
        self,
        features: int,
        hidden: Sequence[int],
        num_params: int,
        order: Sequence[int] | None = None,
        act: str = "relu",
        zero_last: bool = True,
        context_features: int = 0,
    ):
        super().__init__()
        self.features = features
        self.num_params = num_params
        degrees_in = torch.arange(1, features + 1) if order is None else torch.as_tensor(order) + 1
        if sorted(degrees_in.tolist()) != list(range(1, features + 1)):
            raise ValueError(f"order must be a permutation of range({features}), got {list(order)}")
        self.register_buffer("order", degrees_in - 1)
        layers: list[nn.Module] = []
        prev = degrees_in
        top = max(features - 1, 1)
        for h in hidden:
            # hidden degrees 1..D-1; a conditional MADE also has degree-0 units (context only) for the first output
            deg = torch.arange(h) % features if context_features else torch.arange(h) % top + 1
            layers += [MaskedLinear(deg[:, None] >= prev[None, :]), activation(act, inplace=True)]
            prev = deg
        deg_out = degrees_in.repeat_interleave(num_params)
        last = MaskedLinear(deg_out[:, None] > prev[None, :])
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        if context_features:
            self.context_linear = nn.Linear(context_features, layers[0].out_features, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None:
            return self.net(x).view(x.shape[0], self.features, self.num_params)
        a = self.net[0](x) + self.context_linear(context)
        for layer in self.net[1:]:
            a = layer(a)
        return a.view(x.shape[0], self.features, self.num_params)
