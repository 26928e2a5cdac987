"""The choice of contractive network g (Lip(g) <= coeff < 1) used by residual, implicit and monotone blocks.

- ``mlp`` (Residual Flows): :func:`flowforge.nn.lipschitz_net.lipschitz_mlp` for vectors and the fully
  connected blocks, :func:`flowforge.nn.lipschitz_net.lipschitz_convnet` (kernels ``3-1-3``) for images.
- ``dense`` (i-DenseNets, Perugachi-Diaz et al., 2021; the g of Monotone Flows):
  :func:`flowforge.nn.densenet.dense_mlp` / :func:`flowforge.nn.densenet.dense_convnet` with ``depth``
  dense layers of ``growth`` channels and learnable concatenation weights normalised to ``lip_coeff``.

The fully connected blocks at the end of an image model can use the other kind (``fc_kind``): a dense
FC net's last layer maps ``D + depth * growth`` features back to ``D`` (9.7M parameters per block on
CIFAR-10's 3072 features), while Residual Flows' ``D-128-128-D`` has 0.8M.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from flowforge.errors import ConfigError

G_KINDS = ("mlp", "dense")


@dataclass
class ContractiveNets:
    kind: str = "mlp"
    act: str = "lipswish"
    coeff: float = 0.98
    # mlp
    hidden: Sequence[int] = (128, 128, 128)
    channels: int = 512
    kernels: Sequence[int] = (3, 1, 3)
    fc_hidden: Sequence[int] = (128, 128)
    preact: bool = True
    norm: str = "spectral"
    learn_p: bool = False
    # dense
    depth: int = 3
    growth: int = 16
    fc_growth: int = 32
    lip_coeff: float = 0.98
    sn: dict = field(default_factory=dict)
    fc_kind: str | None = None  # the FC blocks' g (default: kind)

    def __post_init__(self):
        self.fc_kind = self.fc_kind or self.kind
        for key, kind in (("g", self.kind), ("fc_g", self.fc_kind)):
            if kind not in G_KINDS:
                raise ConfigError(f"unknown g network '{kind}'; choose model.{key}= one of {G_KINDS}")

    def _lip(self) -> dict:
        return dict(act=self.act, coeff=self.coeff, norm=self.norm, learn_p=self.learn_p, **self.sn)

    def _dense(self) -> dict:
        return dict(depth=self.depth, act=self.act, coeff=self.coeff, lip_coeff=self.lip_coeff, **self.sn)

    def vector(self, d: int, zero_last: bool = True) -> nn.Module:
        """g on vectors (toys, tabular data), starting at zero when ``zero_last`` (identity blocks)."""
        if self.kind == "dense":
            from flowforge.nn.densenet import dense_mlp

            return dense_mlp(d, growth=self.growth, zero_last=zero_last, **self._dense())
        from flowforge.nn.lipschitz_net import lipschitz_mlp

        return lipschitz_mlp(d, self.hidden, preact=False, zero_last=zero_last, **self._lip())

    def image(self, shape: Sequence[int], first: bool = False) -> nn.Module:
        """g on images at their resolution; ``first`` marks the network's first block (no pre-activation)."""
        if self.kind == "dense":
            from flowforge.nn.densenet import dense_convnet

            return dense_convnet(tuple(shape), growth=self.growth, zero_last=False, **self._dense())
        from flowforge.nn.lipschitz_net import lipschitz_convnet

        return lipschitz_convnet(shape, self.channels, self.kernels, preact=self.preact and not first, **self._lip())

    def fc(self, d: int) -> nn.Module:
        """The fully connected blocks at the end of an image model (``fc_kind``)."""
        if self.fc_kind == "dense":
            from flowforge.nn.densenet import dense_mlp

            return dense_mlp(d, growth=self.fc_growth, zero_last=False, **self._dense())
        from flowforge.nn.lipschitz_net import lipschitz_mlp

        return lipschitz_mlp(d, self.fc_hidden, preact=self.preact, zero_last=False, **self._lip())

    def build(self, kind: str, shape: Sequence[int], first: bool = False) -> nn.Module:
        """The g for a block of ``kind`` (``vector | image | fc``, as :func:`flowforge.flows.contractive_stack.
        contractive_stack` names them) on inputs of ``shape``."""
        if kind == "vector":
            return self.vector(shape[0])
        if kind == "image":
            return self.image(shape, first)
        return self.fc(shape[0])
