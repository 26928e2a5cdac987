"""Variational dequantisation (Flow++, Ho et al., 2019) and the dequantiser factory.

Integer images ``x in {0, ..., K-1}^D`` become continuous ``y = (x + u) / K`` with noise
``u in (0, 1)^D`` drawn from a learned, ``x``-conditional density ``q(u | x)``:

    eps ~ N(0, I),   h = g(eps; x),   u = sigmoid(h),

where ``g`` is a flow on the noise (a per-channel affine map, then affine couplings with checkerboard
masks whose scale/shift networks also see a feature map ``c(x)`` of ``x / K - 1/2``).  By the change of
variables

    log q(u | x) = log N(eps; 0, I) - log |det dh/deps| - sum_i log sigmoid'(h_i),
    log sigmoid'(h) = log sigmoid(h) + log sigmoid(-h).

Since ``P(x) = int_{[0,1)^D} p((x + u) / K) K^{-D} du = E_q[p(y) K^{-D} / q(u | x)]``, Jensen gives the
variational bound

    log P(x) >= E_q[ log p(y) - D log K - log q(u | x) ],

which is tight when ``q(u | x)`` is the model's own conditional ``p(u | x)``.  Uniform dequantisation is
the special case ``q = 1`` (bound ``E_u[log p(y)] - D log K``).  The dequantiser returns
``(y, log_weight)`` with ``log_weight = -D log K - log q(u | x)``: what is added to ``log p(y)`` to get
the bound (the contract of :class:`flowforge.flows.preprocessing.UniformDequantization`).  Its parameters
live inside the :class:`flowforge.flows.model.Flow` and are trained jointly with it.

Nothing is clamped: the sigmoid's log-det uses ``logsigmoid``, finite for every ``h``.  In float32 ``u``
rounds to 0 or 1 only for ``|h| > ~16``, which the bound itself penalises (``-log sigmoid'(h) ~ |h|``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.actnorm import ActNorm
from flowforge.flows.base import sum_except_batch
from flowforge.flows.coupling import checkerboard_mask
from flowforge.flows.elementwise import Affine
from flowforge.flows.preprocessing import UniformDequantization
from flowforge.nn import ConvNet

DEQUANTIZATIONS = ("uniform", "variational")

# sigmoid(s * eps), eps ~ N(0, 1), is closest to U(0, 1) (differential entropy -0.01 nats) near s = 1.75,
# so the noise flow starts from that scale instead of the identity (-0.19 nats per dimension at s = 1)
_INIT_SCALE = 1.75


def _positive_int(value, what: str, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer (e.g. {example}), got {value!r}")
    return value


class ContextCoupling(nn.Module):
    """Affine coupling on the noise whose conditioner also sees the context features of ``x``:

    h = m * e + (1 - m) * (e * exp(s) + t),   (t, s) = NN([m * e, c(x)]),   log |det| = sum_{m=0} s.
    """

    def __init__(self, mask: Tensor, context_channels: int, hidden: int):
        super().__init__()
        self.register_buffer("mask", mask.bool())
        self.elementwise = Affine("tanh")
        channels = mask.shape[0]
        self.net = ConvNet(channels + context_channels, hidden, channels * Affine.num_params)  # zero last: identity

    def _params(self, e: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = e.shape
        out = self.net(torch.cat([e * self.mask, context], 1))
        return out.view(b, c, Affine.num_params, h, w).permute(0, 1, 3, 4, 2)

    def _couple(self, e: Tensor, context: Tensor, fn) -> tuple[Tensor, Tensor]:
        out, ladj = fn(e, self._params(e, context))
        return torch.where(self.mask, e, out), sum_except_batch(ladj.masked_fill(self.mask, 0.0))

    def forward(self, e: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(h, log |det dh/de|)``."""
        return self._couple(e, context, self.elementwise.forward)

    def inverse(self, h: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(e, log |det de/dh|)``."""
        return self._couple(h, context, self.elementwise.inverse)


class VariationalDequantization(nn.Module):
    """``forward(x) -> (y, log_weight)`` with ``y = (x + u) / K``, ``u ~ q(u | x)`` and
    ``log_weight = -D log K - log q(u | x)`` (see the module docstring).

    Args:
        shape: the image shape ``(C, H, W)``.
        num_levels: ``K``, the number of pixel levels (x in 0..K-1).
        num_layers: affine coupling layers on the noise (alternating checkerboard masks).
        hidden: channels of the coupling networks and of the context network.
        context_channels: channels of the feature map ``c(x)`` every coupling sees.
    """

    name = "variational"

    def __init__(
        self,
        shape: Sequence[int],
        num_levels: int,
        num_layers: int = 4,
        hidden: int = 32,
        context_channels: int = 16,
    ):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ConfigError(
                f"variational dequantisation acts on images (C, H, W), got shape {shape}; "
                f"use dequantization=uniform for this data"
            )
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ConfigError(f"num_levels must be an integer >= 2 (e.g. 256), got {num_levels!r}")
        self.shape, self.num_levels = shape, num_levels
        num_layers = _positive_int(num_layers, "dequantization.num_layers", 4)
        hidden = _positive_int(hidden, "dequantization.hidden", 32)
        context_channels = _positive_int(context_channels, "dequantization.context_channels", 16)
        self.context = ConvNet(shape[0], hidden, context_channels, zero_last=False)
        self.scale = ActNorm(shape, data_init=False)
        with torch.no_grad():
            self.scale.log_scale.fill_(math.log(_INIT_SCALE))
        self.couplings = nn.ModuleList(
            ContextCoupling(checkerboard_mask(shape, i % 2), context_channels, hidden) for i in range(num_layers)
        )

    def _features(self, x: Tensor) -> Tensor:
        return self.context(x / self.num_levels - 0.5)

    def noise_to_logit(self, eps: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``h = g(eps; x)`` and ``log |det dh/deps|`` per sample."""
        context = self._features(x)
        h, log_det = self.scale(eps)
        for layer in self.couplings:
            h, ld = layer(h, context)
            log_det = log_det + ld
        return h, log_det

    def logit_to_noise(self, h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """The inverse: ``eps = g^{-1}(h; x)`` and ``log |det dh/deps|`` per sample (at that eps)."""
        context = self._features(x)
        log_det = h.new_zeros(h.shape[0])
        for layer in reversed(self.couplings):
            h, ld = layer.inverse(h, context)
            log_det = log_det - ld
        eps, ld = self.scale.inverse_and_log_det(h)
        return eps, log_det - ld

    @staticmethod
    def _log_q(eps: Tensor, h: Tensor, log_det: Tensor) -> Tensor:
        log_normal = sum_except_batch(-0.5 * eps.pow(2) - 0.5 * math.log(2 * math.pi))
        log_sigmoid_grad = sum_except_batch(F.logsigmoid(h) + F.logsigmoid(-h))
        return log_normal - log_det - log_sigmoid_grad

    def dequantize(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, log q(u | x))`` for given standard normal noise ``eps`` (deterministic)."""
        h, log_det = self.noise_to_logit(eps, x)
        return torch.sigmoid(h), self._log_q(eps, h, log_det)

    def log_prob(self, u: Tensor, x: Tensor) -> Tensor:
        """``log q(u | x)`` per sample for ``u`` in (0, 1)^D, by inverting the noise flow."""
        h = torch.log(u) - torch.log1p(-u)
        eps, log_det = self.logit_to_noise(h, x)
        return self._log_q(eps, h, log_det)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u, log_q = self.dequantize(x, torch.randn_like(x))
        d = x[0].numel()
        return (x + u) / self.num_levels, -d * math.log(self.num_levels) - log_q

    quantize = UniformDequantization.quantize  # floor(y K) clamped to 0..K-1, as for uniform noise


def check_dequantization(name: str) -> str:
    """``name`` if it is a known dequantisation, else a :class:`ConfigError` listing the choices."""
    if name not in DEQUANTIZATIONS:
        raise ConfigError(
            f"unknown dequantization '{name}'; choose dequantization= one of {', '.join(DEQUANTIZATIONS)}"
        )
    return name


def make_dequantizer(name: str, shape: Sequence[int], num_levels: int, **kwargs) -> nn.Module:
    """The dequantiser called ``name`` (``uniform`` or ``variational``) for images of ``shape``.

    ``kwargs`` are the variational options (``num_layers``, ``hidden``, ``context_channels``); uniform
    dequantisation has none.
    """
    if check_dequantization(name) == "uniform":
        if kwargs:
            raise ConfigError(
                f"dequantization=uniform takes no options, got {sorted(kwargs)}; remove them or use "
                f"dequantization=variational"
            )
        return UniformDequantization(int(num_levels))
    allowed = ("num_layers", "hidden", "context_channels")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for dequantization=variational; it takes {', '.join(allowed)}")
    return VariationalDequantization(shape, int(num_levels), **kwargs)
