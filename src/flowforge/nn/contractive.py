"""The contractive network g (Lip(g) <= coeff < 1) of residual, implicit and monotone blocks: options, builder.

- ``mlp`` (Residual Flows): :func:`flowforge.nn.lipschitz_net.lipschitz_mlp` for vectors and the fully
  connected blocks, :func:`flowforge.nn.lipschitz_net.lipschitz_convnet` (kernels ``3-1-3``) for images.
- ``dense`` (i-DenseNets, Perugachi-Diaz et al., 2021; the g of Monotone Flows):
  :func:`flowforge.nn.densenet.dense_mlp` / :func:`flowforge.nn.densenet.dense_convnet` with ``depth``
  dense layers of ``growth`` channels and learnable concatenation weights normalised to ``lip_coeff``.

The fully connected blocks at the end of an image model can use the other kind (``fc_kind``): a dense
FC net's last layer maps ``D + depth * growth`` features back to ``D`` (9.7M parameters per block on
CIFAR-10's 3072 features), while Residual Flows' ``D-128-128-D`` has 0.8M.

:class:`GNet` says what g is, :class:`Lipschitz` how its layers are held to their bound, and
:class:`ContractiveNets` builds the g of each block from the two.  A field whose config key
(``model.<key>``) differs from its name carries the key in its metadata (``key``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from flowforge.errors import ConfigError

G_KINDS = ("mlp", "dense")


@dataclass(frozen=True)
class GNet:
    """The g network of every block; the defaults are Residual Flows' (Chen et al., 2019).

    - Kind: ``kind`` (config key ``g``) ``mlp | dense``; ``fc_kind`` (``fc_g``) the g of the fully
      connected blocks at the end of image models (``None``: the same as ``kind``).
    - Bound: each layer's norm is at most ``coeff`` < 1 and the activation ``act`` is 1-Lipschitz, so
      Lip(g) <= coeff (``dense``: coeff * lip_coeff^depth).
    - ``mlp`` sizes: ``hidden`` (widths of the vector g), ``channels`` (hidden width of the image g),
      ``kernels`` (its convolution sizes), ``fc_hidden`` (widths of the fully connected g), ``preact``
      (an activation before the image and fully connected g, except the network's first block).
    - ``dense`` sizes: ``depth`` dense layers of ``growth`` channels (``fc_growth`` in the fully connected
      blocks) with concatenation weights normalised to ``lip_coeff``.
    """

    kind: str = field(default="mlp", metadata={"key": "g"})
    act: str = "lipswish"
    coeff: float = 0.98
    hidden: Sequence[int] = (128, 128, 128)
    channels: int = 512
    kernels: Sequence[int] = (3, 1, 3)
    fc_hidden: Sequence[int] = (128, 128)
    preact: bool = True
    depth: int = 3
    growth: int = 16
    fc_growth: int = 32
    lip_coeff: float = 0.98
    fc_kind: str | None = field(default=None, metadata={"key": "fc_g"})

    def __post_init__(self):
        for key, kind in (("g", self.kind), ("fc_g", self.fc_kind or self.kind)):
            if kind not in G_KINDS:
                raise ConfigError(f"unknown g network '{kind}'; choose model.{key}= one of {G_KINDS}")


@dataclass(frozen=True)
class Lipschitz:
    """How each layer of g is held to its bound ``coeff``.

    - ``norm``: ``spectral`` (the largest singular value, by power iteration) or ``induced`` (mixed
      ``(p, q)`` operator norms, with ``learn_p`` learnable orders); ``dense`` g always use ``spectral``.
    - The power iteration after each optimiser step stops at relative change ``rtol`` (config key
      ``sn_rtol``) or after ``max_iters`` (``sn_max_iters``) iterations.
    """

    norm: str = "spectral"
    learn_p: bool = False
    rtol: float = field(default=1e-3, metadata={"key": "sn_rtol"})
    max_iters: int = field(default=200, metadata={"key": "sn_max_iters"})


@dataclass(frozen=True)
class ContractiveNets:
    """Builds the g of each block from the network options ``g`` and the normalisation ``lipschitz``;
    with ``context_features > 0`` every g reads the context features as an additive bias of its first
    normalised layer (:class:`flowforge.nn.lipschitz_net.ContextBias`)."""

    g: GNet = GNet()
    lipschitz: Lipschitz = Lipschitz()
    context_features: int = 0

    def _power(self) -> dict:
        return dict(sn_rtol=self.lipschitz.rtol, sn_max_iters=self.lipschitz.max_iters)

    def _lip(self) -> dict:
        norm = dict(norm=self.lipschitz.norm, learn_p=self.lipschitz.learn_p)
        return dict(act=self.g.act, coeff=self.g.coeff, **norm, **self._power(), **self._context())

    def _context(self) -> dict:
        return {"context_features": self.context_features} if self.context_features else {}

    def _dense(self) -> dict:
        g = self.g
        return dict(depth=g.depth, act=g.act, coeff=g.coeff, lip_coeff=g.lip_coeff, **self._power(), **self._context())

    def vector(self, d: int, zero_last: bool = True) -> nn.Module:
        """g on vectors (toys, tabular data), starting at zero when ``zero_last`` (identity blocks)."""
        if self.g.kind == "dense":
            from flowforge.nn.densenet import dense_mlp

            return dense_mlp(d, growth=self.g.growth, zero_last=zero_last, **self._dense())
        from flowforge.nn.lipschitz_net import lipschitz_mlp

        return lipschitz_mlp(d, self.g.hidden, preact=False, zero_last=zero_last, **self._lip())

    def image(self, shape: Sequence[int], first: bool = False) -> nn.Module:
        """g on images at their resolution; ``first`` marks the network's first block (no pre-activation)."""
        g = self.g
        if g.kind == "dense":
            from flowforge.nn.densenet import dense_convnet

            return dense_convnet(tuple(shape), growth=g.growth, zero_last=False, **self._dense())
        from flowforge.nn.lipschitz_net import lipschitz_convnet

        return lipschitz_convnet(shape, g.channels, g.kernels, preact=g.preact and not first, **self._lip())

    def fc(self, d: int) -> nn.Module:
        """The fully connected blocks at the end of an image model (``fc_kind``)."""
        if (self.g.fc_kind or self.g.kind) == "dense":
            from flowforge.nn.densenet import dense_mlp

            return dense_mlp(d, growth=self.g.fc_growth, zero_last=False, **self._dense())
        from flowforge.nn.lipschitz_net import lipschitz_mlp

        return lipschitz_mlp(d, self.g.fc_hidden, preact=self.g.preact, zero_last=False, **self._lip())

    def build(self, kind: str, shape: Sequence[int], first: bool = False) -> nn.Module:
        """The g for a block of ``kind`` (``vector | image | fc``, as :func:`flowforge.flows.contractive_stack.
        contractive_stack` names them) on inputs of ``shape``."""
        if kind == "vector":
            return self.vector(shape[0])
        if kind == "image":
            return self.image(shape, first)
        return self.fc(shape[0])
