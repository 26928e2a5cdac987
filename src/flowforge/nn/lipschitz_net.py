"""Contractive networks ``g`` for invertible residual blocks, with a cheap linearisation.

``g = L_n o a o ... o a o L_1`` where each ``L_i`` is a spectrally normalised linear or convolutional
layer (norm <= coeff) and each ``a`` a 1-Lipschitz activation, so Lip(g) <= coeff < 1.  With
pre-activation (Residual Flows' image blocks) an activation also comes first.

``linearize(x)`` returns ``(g(x), jvp)`` with ``jvp(v) = J_g(x) v = W_n D_{n-1} W_{n-1} ... D_1 W_1 v``:
the normalised weights ``W_i`` and activation derivatives ``D_i`` are computed once, so every further
product ``J^k v`` is one pass of matrix products and elementwise scalings (no autograd graph walk).

Conditional g (``context_features > 0``): the context features ``h`` enter only as an additive bias of the
first normalised layer, ``W_1 x + b_1 + U h`` (:class:`ContextBias`; ``U`` unconstrained, a per-channel bias
broadcast over H x W on images).  The bias does not depend on x, so ``J_g(x; h)`` has the same product form
and Lip_x(g(., h)) <= prod_i ||W_i|| <= coeff for every h: the context weights take no part in the
normalisation.  Without context the network has exactly the layers it has unconditionally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.nn.activations import channel_multiplier, lipschitz_activation

Jvp = Callable[[Tensor], Tensor]


def _weight_op(layer: nn.Module) -> tuple[Callable[[Tensor, Tensor, Tensor | None], Tensor], Tensor]:
    """The layer's normalised weight and the functional op ``op(input, weight, bias)`` applying it."""
    w = layer.normalized_weight()
    if w.dim() == 2:
        return F.linear, w
    stride, padding = getattr(layer, "stride", 1), getattr(layer, "padding", 0)
    return (lambda v, w_, b=None: F.conv2d(v, w_, b, stride, padding)), w


class ContextBias(nn.Module):
    """``u -> u + U h``: the context's additive bias after a normalised layer, ``U`` an unconstrained linear map
    of the ``features`` context features to ``channels`` (broadcast over the spatial dimensions of images).

    Its derivative in ``u`` is the identity, so it leaves the Lipschitz constant in x unchanged."""

    def __init__(self, features: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(int(features), int(channels), bias=False)

    def forward(self, u: Tensor, context: Tensor) -> Tensor:
        b = self.proj(context.to(u.dtype))
        return u + b.view(*b.shape, *([1] * (u.dim() - 2)))

    def linearize(self, u: Tensor, context: Tensor) -> tuple[Tensor, Jvp]:
        return self(u, context), lambda v: v


def takes_context(layer: nn.Module) -> bool:
    """Whether ``layer`` reads the context features (a :class:`ContextBias`, or a layer holding one)."""
    return isinstance(layer, ContextBias) or getattr(layer, "context_bias", None) is not None


class LipschitzNet(nn.Sequential):
    """A sequence of Lipschitz layers (``normalized_weight``) and activations (``linearize``); in a conditional
    net also layers reading the context features (:func:`takes_context`, module docstring)."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None:
            return super().forward(x)
        for layer in self:
            x = layer(x, context) if takes_context(layer) else layer(x)
        return x

    def linearize(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Jvp]:
        ops: list[Jvp] = []
        h = x
        for layer in self:
            if hasattr(layer, "normalized_weight"):
                op, w = _weight_op(layer)
                h = op(h, w, layer.bias)
                ops.append(lambda v, op=op, w=w: op(v, w, None))
            else:
                h, jvp = (
                    layer.linearize(h, context) if context is not None and takes_context(layer) else layer.linearize(h)
                )
                ops.append(jvp)

        def jvp_all(v: Tensor) -> Tensor:
            for f in ops:
                v = f(v)
            return v

        return h, jvp_all


def _check_coeff(coeff: float) -> float:
    if not 0.0 < float(coeff) < 1.0:
        raise ConfigError(
            f"coeff must be in (0, 1) so that Lip(g) < 1 and the residual block is invertible, got {coeff}; "
            f"use e.g. 0.9 (i-ResNet, toys) or 0.98 (Residual Flow images)"
        )
    return float(coeff)


def _norm_kwargs(norm: str, domain: float, codomain: float, learn_p: bool) -> dict:
    if norm == "spectral":
        return {}
    if norm == "induced":
        return {"domain": domain, "codomain": codomain, "learn_p": learn_p}
    raise ConfigError(f"unknown Lipschitz norm '{norm}'; choose spectral or induced")


def _linear_cls(norm: str):
    if norm == "spectral":
        from flowforge.nn.lipschitz import SpectralNormLinear

        return SpectralNormLinear
    from flowforge.nn.induced_norm import InducedNormLinear

    return InducedNormLinear


def _conv_cls(norm: str):
    if norm == "spectral":
        from flowforge.nn.lipschitz import SpectralNormConv2d

        return SpectralNormConv2d
    from flowforge.nn.induced_norm import InducedNormConv2d

    return InducedNormConv2d


def _layer_setup(
    kind: str,
    act: str,
    coeff: float,
    *,
    norm: str,
    domain: float,
    codomain: float,
    learn_p: bool,
    sn_rtol: float,
    sn_max_iters: int,
) -> tuple[type, dict, int]:
    """The Lipschitz layer class (``kind`` linear or conv), its keyword arguments, and the channel
    multiplier of the activation."""
    cls = _linear_cls(norm) if kind == "linear" else _conv_cls(norm)
    sn = dict(
        coeff=_check_coeff(coeff),
        rtol=sn_rtol,
        max_iters=sn_max_iters,
        **_norm_kwargs(norm, domain=domain, codomain=codomain, learn_p=learn_p),
    )
    return cls, sn, channel_multiplier(act)


def lipschitz_mlp(
    features: int,
    hidden: Sequence[int],
    act: str = "lipswish",
    coeff: float = 0.9,
    preact: bool = False,
    zero_last: bool = True,
    norm: str = "spectral",
    domain: float = 2.0,
    codomain: float = 2.0,
    learn_p: bool = False,
    sn_rtol: float = 1e-3,
    sn_max_iters: int = 200,
    context_features: int = 0,
) -> LipschitzNet:
    """``features -> hidden... -> features`` with Lipschitz constant <= coeff (the toy/tabular g and
    the fully connected blocks at the end of the image model); with ``context_features`` the first layer
    adds the context bias ``U h`` (:class:`ContextBias`)."""
    cls, sn, mult = _layer_setup(
        "linear",
        act,
        coeff,
        norm=norm,
        domain=domain,
        codomain=codomain,
        learn_p=learn_p,
        sn_rtol=sn_rtol,
        sn_max_iters=sn_max_iters,
    )
    layers: list[nn.Module] = [lipschitz_activation(act)] if preact else []
    width = features * (mult if preact else 1)
    for h in hidden:
        layers += [cls(width, h, **sn), lipschitz_activation(act)]
        width = h * mult
    layers.append(cls(width, features, zero_init=zero_last, **sn))
    return LipschitzNet(*with_context_bias(layers, context_features))


def with_context_bias(layers: list[nn.Module], context_features: int) -> list[nn.Module]:
    """``layers`` with a :class:`ContextBias` after the first normalised layer (``context_features > 0``)."""
    if not context_features:
        return layers
    i = next(i for i, layer in enumerate(layers) if hasattr(layer, "normalized_weight"))
    width = layers[i].weight.shape[0]
    return [*layers[: i + 1], ContextBias(context_features, width), *layers[i + 1 :]]


def lipschitz_convnet(
    shape: Sequence[int],
    width: int = 512,
    kernels: Sequence[int] = (3, 1, 3),
    act: str = "lipswish",
    coeff: float = 0.98,
    preact: bool = True,
    zero_last: bool = False,
    norm: str = "spectral",
    domain: float = 2.0,
    codomain: float = 2.0,
    learn_p: bool = False,
    sn_rtol: float = 1e-3,
    sn_max_iters: int = 200,
    context_features: int = 0,
) -> LipschitzNet:
    """Residual Flows' image ``g``: ``[a ->] conv k1 -> a -> conv k2 -> a -> ... -> conv kn`` at the
    input resolution (stride 1, same padding), hidden width ``width``; with ``context_features`` the first
    convolution adds the per-channel context bias ``U h`` (:class:`ContextBias`)."""
    c, h, w = (int(s) for s in shape)
    cls, sn, mult = _layer_setup(
        "conv",
        act,
        coeff,
        norm=norm,
        domain=domain,
        codomain=codomain,
        learn_p=learn_p,
        sn_rtol=sn_rtol,
        sn_max_iters=sn_max_iters,
    )
    layers: list[nn.Module] = [lipschitz_activation(act)] if preact else []
    cin = c * (mult if preact else 1)
    kernels = [int(k) for k in kernels]
    if not kernels or any(k % 2 == 0 for k in kernels):
        raise ConfigError(f"kernels must be odd sizes such as [3, 1, 3], got {kernels}")
    for i, k in enumerate(kernels):
        last = i == len(kernels) - 1
        cout = c if last else width
        layers.append(cls(cin, cout, k, input_size=(h, w), padding=k // 2, zero_init=last and zero_last, **sn))
        if not last:
            layers.append(lipschitz_activation(act))
        cin = cout * mult
    return LipschitzNet(*with_context_bias(layers, context_features))
