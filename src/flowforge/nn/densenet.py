"""i-DenseNet's contractive ``g`` (Perugachi-Diaz et al., 2021) for invertible residual blocks.

A dense layer keeps its input and appends ``growth`` new channels (along dim 1)::

    h(x)     = a(L(x))                                  L: spectral-norm layer, ||L|| <= coeff < 1
    D(x)     = [eta_1 x, eta_2 h(x)]                    C -> C + growth channels
    eta_j    = softplus(K_j) + 0.1,  then  (eta_1, eta_2) <- lip_coeff (eta_1, eta_2) / ||(eta_1, eta_2)||_2

``L`` is a linear layer (vectors) or a 3x3 convolution at the input resolution (images) with
``growth / m`` outputs, ``m`` the channel multiplier of the 1-Lipschitz activation ``a`` (2 for the
concatenating CPila / CLipSwish, else 1).  Since ``||D(x) - D(y)||^2 = eta_1^2 ||x - y||^2 +
eta_2^2 ||h(x) - h(y)||^2`` and Lip(h) <= coeff < 1, every dense layer has Lip(D) <= lip_coeff.  The network

    g = L_out o D_depth o ... o D_1                     L_out: linear / 1x1 conv, C + depth growth -> C

therefore satisfies  **Lip(g) <= coeff * lip_coeff^depth**  (e.g. 0.98 * 0.98^3 = 0.922 with the defaults).

``K = (K_1, K_2)`` (one parameter of two scalars per layer) starts at ``(0, 0)``, i.e. eta_1 = eta_2 =
softplus(0) + 0.1 before the rescaling and eta_1 = eta_2 = lip_coeff / sqrt(2) after it.  The paper learns K
only from some epoch on: :func:`set_concat_weights_learnable` switches every dense layer's
``learnable_concat`` flag; while it is False (the default) K's gradient is exactly zero (K stays in the
graph, so DDP needs no ``find_unused_parameters``); Adam, with zero moments and K = 0, then leaves it at 0.

``linearize(x)`` returns ``(g(x), jvp)`` with ``jvp(v) = J_g(x) v``; per dense layer
``J_D v = [eta_1 v, eta_2 a'(L x) (W v)]``, with the normalised weights and activation derivatives computed
once per call (frozen at ``x``), differentiable in x and the parameters when grad mode is on.

Conditional g (``context_features > 0``): the first dense layer computes ``a(L(x) + U h)``
(:class:`~flowforge.nn.lipschitz_net.ContextBias`, ``U`` unconstrained); the bias is constant in x, so the bound
Lip_x(g(., h)) <= coeff * lip_coeff^depth holds for every context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.nn.activations import lipschitz_activation
from flowforge.nn.lipschitz_net import ContextBias, Jvp, LipschitzNet, _layer_setup, _weight_op

#: offset of the concatenation weights: eta = softplus(K) + ETA_MIN before the rescaling
ETA_MIN = 0.1


class DenseLayer(nn.Module):
    """``x -> [eta_1 x, eta_2 a(L(x))]`` along dim 1 with ``sqrt(eta_1^2 + eta_2^2) = lip_coeff``.

    ``layer`` is a spectral-norm (``normalized_weight``) layer, ``act`` a 1-Lipschitz activation with
    ``linearize``.  ``concat_k`` holds (K_1, K_2); it receives gradients only while ``learnable_concat``.
    ``context_features > 0`` adds the context bias after ``layer``: ``a(L(x) + U h)``.
    """

    def __init__(self, layer: nn.Module, act: nn.Module, lip_coeff: float = 0.98, context_features: int = 0):
        super().__init__()
        self.layer = layer
        self.act = act
        self.lip_coeff = _check_lip_coeff(lip_coeff)
        self.concat_k = nn.Parameter(torch.zeros(2))
        self.learnable_concat = False
        self.context_bias = ContextBias(context_features, layer.weight.shape[0]) if context_features else None

    def concat_weights(self) -> Tensor:
        """``(eta_1, eta_2)``, rescaled to 2-norm ``lip_coeff`` (K gets a zero gradient unless ``learnable_concat``)."""
        # frozen: K stays in the graph with a zero gradient (not detached), so DDP sees every parameter
        # used on every step and needs no find_unused_parameters
        k = self.concat_k if self.learnable_concat else self.concat_k.detach() + 0.0 * self.concat_k
        eta = F.softplus(k) + ETA_MIN
        return eta * (self.lip_coeff / torch.linalg.vector_norm(eta))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        eta = self.concat_weights().to(x.dtype)
        u = self.layer(x)
        if context is not None:
            u = self.context_bias(u, context)
        return torch.cat([eta[0] * x, eta[1] * self.act(u)], dim=1)

    def linearize(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Jvp]:
        op, w = _weight_op(self.layer)
        u = op(x, w, self.layer.bias)
        if context is not None:
            u = self.context_bias(u, context)
        h, act_jvp = self.act.linearize(u)
        eta = self.concat_weights().to(x.dtype)
        y = torch.cat([eta[0] * x, eta[1] * h], dim=1)
        return y, lambda v: torch.cat([eta[0] * v, eta[1] * act_jvp(op(v, w, None))], dim=1)

    def extra_repr(self) -> str:
        return f"lip_coeff={self.lip_coeff}, learnable_concat={self.learnable_concat}"


class DenseNet(LipschitzNet):
    """``L_out o D_depth o ... o D_1`` (a :class:`LipschitzNet`: its ``linearize`` chains the dense
    layers' ``linearize`` and the last layer's normalised weight).  ``lipschitz_bound`` is
    ``coeff * lip_coeff^depth``."""

    def __init__(self, *layers: nn.Module, lipschitz_bound: float):
        super().__init__(*layers)
        self.lipschitz_bound = float(lipschitz_bound)


def set_concat_weights_learnable(module: nn.Module, flag: bool) -> int:
    """Let the concatenation weights K of every :class:`DenseLayer` in ``module`` receive gradients
    (``flag=True``, e.g. from a given epoch on) or not (``False``, the default at construction).
    Returns the number of dense layers switched."""
    if not isinstance(flag, bool):
        raise ConfigError(f"set_concat_weights_learnable: flag must be True or False, got {flag!r}")
    layers = [m for m in module.modules() if isinstance(m, DenseLayer)]
    for m in layers:
        m.learnable_concat = flag
    return len(layers)


def _check_lip_coeff(lip_coeff: float) -> float:
    if isinstance(lip_coeff, bool) or not isinstance(lip_coeff, (int, float)) or not 0.0 < lip_coeff < 1.0:
        raise ConfigError(
            f"lip_coeff must be in (0, 1): it is the 2-norm of the concatenation weights (eta_1, eta_2) and "
            f"bounds each dense layer's Lipschitz constant, got {lip_coeff!r}; use e.g. 0.98"
        )
    return float(lip_coeff)


def _check_sizes(depth: int, growth: int, act: str, mult: int) -> int:
    for name, value in (("depth", depth), ("growth", growth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"dense network: {name} must be a positive integer, got {value!r}")
    if growth % mult:
        raise ConfigError(
            f"dense network: growth must be a multiple of {mult} with act='{act}', which concatenates "
            f"{mult} copies of its input channels, got growth={growth}; use an even growth such as {growth + 1}"
        )
    if act == "maxmin" and growth % 2:
        raise ConfigError(
            f"dense network: act='maxmin' sorts channel pairs, so growth must be even, got {growth}; use {growth + 1}"
        )
    return growth // mult


def _assemble(
    channels: int,
    depth: int,
    growth: int,
    act: str,
    mult: int,
    lip_coeff: float,
    coeff: float,
    dense: Callable[[int, int], nn.Module],
    out: Callable[[int], nn.Module],
    context_features: int = 0,
) -> DenseNet:
    """``depth`` dense layers around ``dense(width, growth / mult)`` then ``out(channels + depth * growth)``;
    the first dense layer reads the context (``context_features > 0``)."""
    lip_coeff = _check_lip_coeff(lip_coeff)
    hidden = _check_sizes(depth, growth, act, mult)
    layers: list[nn.Module] = []
    width = channels
    for i in range(depth):
        features = context_features if i == 0 else 0
        layers.append(DenseLayer(dense(width, hidden), lipschitz_activation(act), lip_coeff, features))
        width += growth
    layers.append(out(width))
    return DenseNet(*layers, lipschitz_bound=coeff * lip_coeff**depth)


def dense_mlp(
    features: int,
    depth: int = 3,
    growth: int = 16,
    act: str = "cpila",
    coeff: float = 0.98,
    lip_coeff: float = 0.98,
    zero_last: bool = True,
    sn_rtol: float = 1e-3,
    sn_max_iters: int = 200,
    context_features: int = 0,
) -> DenseNet:
    """i-DenseNet ``g`` on vectors: ``features -> features + depth * growth -> features`` with
    Lip(g) <= coeff * lip_coeff^depth.  ``zero_last`` starts the block at the identity."""
    cls, sn, mult = _layer_setup(
        "linear",
        act,
        coeff,
        norm="spectral",
        domain=2.0,
        codomain=2.0,
        learn_p=False,
        sn_rtol=sn_rtol,
        sn_max_iters=sn_max_iters,
    )
    return _assemble(
        features,
        depth=depth,
        growth=growth,
        act=act,
        mult=mult,
        lip_coeff=lip_coeff,
        coeff=sn["coeff"],
        dense=lambda width, hidden: cls(width, hidden, **sn),
        out=lambda width: cls(width, features, zero_init=zero_last, **sn),
        context_features=context_features,
    )


def dense_convnet(
    shape: Sequence[int],
    depth: int = 3,
    growth: int = 172,
    act: str = "cpila",
    coeff: float = 0.98,
    lip_coeff: float = 0.98,
    zero_last: bool = False,
    sn_rtol: float = 1e-3,
    sn_max_iters: int = 200,
    context_features: int = 0,
) -> DenseNet:
    """i-DenseNet ``g`` on images ``(C, H, W)``: 3x3 dense convolutions at the input resolution
    (stride 1, same padding), then a 1x1 convolution ``C + depth * growth -> C``;
    Lip(g) <= coeff * lip_coeff^depth."""
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
        raise ConfigError(f"dense_convnet: shape must be (C, H, W), got {shape!r}")
    c, h, w = (int(s) for s in shape)
    cls, sn, mult = _layer_setup(
        "conv",
        act,
        coeff,
        norm="spectral",
        domain=2.0,
        codomain=2.0,
        learn_p=False,
        sn_rtol=sn_rtol,
        sn_max_iters=sn_max_iters,
    )
    return _assemble(
        c,
        depth=depth,
        growth=growth,
        act=act,
        mult=mult,
        lip_coeff=lip_coeff,
        coeff=sn["coeff"],
        dense=lambda width, hidden: cls(width, hidden, 3, input_size=(h, w), padding=1, **sn),
        out=lambda width: cls(width, c, 1, input_size=(h, w), padding=0, zero_init=zero_last, **sn),
        context_features=context_features,
    )


__all__ = ["DenseLayer", "DenseNet", "dense_convnet", "dense_mlp", "set_concat_weights_learnable"]
