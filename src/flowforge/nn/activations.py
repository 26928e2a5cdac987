"""1-Lipschitz activations for invertible residual blocks, each with its Jacobian-vector product.

Every activation ``phi`` here has Lip(phi) <= 1, so a network of spectrally normalised layers with
norms <= c and these activations has Lip(g) <= c.  ``linearize(x)`` returns ``(phi(x), jvp)`` where
``jvp(v) = J_phi(x) v`` reuses the derivative computed once at ``x`` ("activation derivatives frozen at
the input"), so the k-th power-series term J_g^k v of a residual block costs one cheap pass of matrix
products rather than a fresh autograd call.  The derivative tensors are built with autograd when grad
mode is on, so the JVP is differentiable in x and in the parameters (needed by the Neumann surrogate).

- LipSwish (Chen et al., 2019): ``phi(z) = z sigmoid(beta z) / 1.1``, ``beta = softplus(b)``, b learnable
  (init 0.5);  ``phi'(z) = [s + beta z s (1 - s)] / 1.1`` with ``s = sigmoid(beta z)``.
- CLipSwish (Perugachi-Diaz et al., 2021): ``[LipSwish(z), LipSwish(-z)] / 1.004`` along channels
  (doubles the channel count); the 1.004 makes the concatenation 1-Lipschitz.
- Pila (Perugachi-Diaz et al., 2021), ``k > 0`` (default 5), with ``t = k z``::

      Pila(z)   = z                                        z > 0
                = (k^2/2 z^3 - k z^2 + z) e^{kz}
                = (t^3/2 - t^2 + t) e^t / k                z <= 0
      Pila'(z)  = 1                                        z > 0
                = (t^3/2 + t^2/2 - t + 1) e^t              z <= 0
      Pila''(z) = 0                                        z > 0
                = k (t^3/2 + 2 t^2) e^t                    z <= 0

  C^2 at 0 (value 0, slope 1, curvature 0 from both sides).  The slope depends on ``t`` only, so its
  range does not depend on k: ``Pila'`` is minimal where ``Pila'' = 0``, at ``t = -4``, with value
  ``-19 e^{-4} = -0.3480``, and maximal (1) on ``z >= 0``; hence Lip(Pila) = 1.  Non-monotone on z < 0:
  minimum where ``t^3 + t^2 - 2t + 2 = 0`` (t = -2.2695), ``Pila = -1.3711 / k`` (-0.2742 at z = -0.4539
  for k = 5).  Products are evaluated as ``(e^t t) t ...`` so no intermediate overflows.
- CPila (Perugachi-Diaz et al., 2021): ``[Pila_5(z - 0.2), Pila_5(-z - 0.2)] / 1.06`` along channels
  (doubles the channel count).  Its Jacobian stacks two diagonal matrices, so its 2-norm Lipschitz
  constant is ``max_z sqrt(Pila'(z - 0.2)^2 + Pila'(-z - 0.2)^2) / 1.06``; the maximum is at
  ``z = +-0.6`` (one slope 1, the other the minimum slope -19 e^{-4}):
  ``sqrt(1 + 361 e^{-8}) / 1.06 = 1.05882 / 1.06 = 0.99889 <= 1``.
- MaxMin (Anil et al., 2019): channel pairs ``(a, b) -> (max(a, b), min(a, b))``; gradient-norm preserving.
- ELU, softplus, ``sin(2 pi z) / (2 pi)`` and the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import ConfigError

Jvp = Callable[[Tensor], Tensor]


#: ``pullback(c_value, c_slope) -> (dL/dx, [dL/dp for each trainable parameter p])`` for
#: ``L = <c_value, phi(x)> + <c_slope, phi'(x)>`` (``c_slope`` may be ``None``: no slope term); it may
#: overwrite ``c_value`` and ``c_slope`` (the caller passes tensors it no longer needs)
Pullback = Callable[[Tensor, "Tensor | None"], tuple[Tensor, list[Tensor]]]


class ElementwiseActivation(nn.Module):
    """An activation applied per element; subclasses give ``value_and_derivative(x)``."""

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.value_and_derivative(x)[0]

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        y, d = self.value_and_derivative(x)
        return y, lambda v: v * d

    def second_order(self, x: Tensor) -> tuple[Tensor, Tensor, Pullback]:
        """``(phi(x), phi'(x), pullback)`` without a graph; the pullback (see :data:`Pullback`) carries
        ``phi'`` and ``phi''`` and the parameters' derivatives of both.  Here by autograd through
        ``value_and_derivative``; an activation may give the derivatives in closed form."""
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.enable_grad():
            h = x.detach().requires_grad_(True)
            y, d = self.value_and_derivative(h)

        def pullback(c_value: Tensor, c_slope: Tensor | None) -> tuple[Tensor, list[Tensor]]:
            outs, cots = ((y, d), (c_value, c_slope)) if c_slope is not None else ((y,), (c_value,))
            gx, *gp = torch.autograd.grad(outs, [h, *params], cots, allow_unused=True)
            gx = torch.zeros_like(h) if gx is None else gx
            return gx, [torch.zeros_like(p) if g is None else g for g, p in zip(gp, params)]

        return y.detach(), d.detach(), pullback


class LipSwish(ElementwiseActivation):
    def __init__(self, beta_init: float = 0.5):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(F.softplus(self.beta) * x) / 1.1

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        beta = F.softplus(self.beta)
        s = torch.sigmoid(beta * x)
        return x * s / 1.1, (s + beta * x * s * (1 - s)) / 1.1

    def second_order(self, x: Tensor) -> tuple[Tensor, Tensor, Pullback]:
        """Closed form, with ``s = sigmoid(beta z)``, ``s' = s (1 - s)`` and ``k = s' (2 + beta z (1 - 2 s)) / 1.1``:
        ``phi'' = beta k``, ``d phi / d beta = z^2 s' / 1.1``, ``d phi' / d beta = z k``, and
        ``d beta / d b = sigmoid(b)``."""
        with torch.no_grad():
            beta = F.softplus(self.beta)
            bx = x * beta
            s = torch.sigmoid(bx)
            ds = torch.addcmul(s, s, s, value=-1.0).mul_(1 / 1.1)  # s' / 1.1
            zero = x.new_zeros(())
            y = torch.addcmul(zero, x, s, value=1 / 1.1)
            d = torch.addcmul(s.mul_(1 / 1.1), bx, ds)
            # k and q while s', beta z and z are in cache: k = s' (2 + beta z - 2 beta z s) / 1.1, q = z^2 s' / 1.1
            k = torch.add(bx, 2.0).addcmul_(bx, s, value=-2.0 * 1.1).mul_(ds)
            q = torch.addcmul(zero, x, x).mul_(ds) if self.beta.requires_grad else None
            del s, ds, bx

        def pullback(c_value: Tensor, c_slope: Tensor | None) -> tuple[Tensor, list[Tensor]]:
            with torch.no_grad():
                ck = c_slope.mul_(k) if c_slope is not None else None
                grads = []
                if q is not None:
                    gbeta = torch.dot(c_value.reshape(-1), q.reshape(-1))
                    if ck is not None:
                        gbeta = gbeta + torch.dot(ck.reshape(-1), x.reshape(-1))
                    grads.append(gbeta * torch.sigmoid(self.beta.detach()))
                gx = c_value.mul_(d)
                if ck is not None:
                    gx.addcmul_(ck, beta)
                return gx, grads

        return y, d, pullback


class CLipSwish(nn.Module):
    """Concatenated LipSwish along dim 1: ``C -> 2C`` channels."""

    scale = 1.004
    channel_multiplier = 2

    def __init__(self, beta_init: float = 0.5):
        super().__init__()
        self.swish = LipSwish(beta_init)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.swish(x), self.swish(-x)], dim=1) / self.scale

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        y1, d1 = self.swish.value_and_derivative(x)
        y2, d2 = self.swish.value_and_derivative(-x)
        y = torch.cat([y1, y2], dim=1) / self.scale
        return y, lambda v: torch.cat([v * d1, -v * d2], dim=1) / self.scale


class CReLU(nn.Module):
    """Concatenated ReLU along dim 1: ``[relu(x), relu(-x)]`` (``C -> 2C``), 1-Lipschitz in the 2-norm (for each
    input at most one of the two outputs moves by more than zero, by at most ``|dx|``). Piecewise linear: its
    second derivative is zero, so it suits exact log-dets and regression (Monotone Flows' 1-D fits)."""

    channel_multiplier = 2

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=1)

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        pos, neg = (x > 0).to(x.dtype), (x < 0).to(x.dtype)
        return self(x), lambda v: torch.cat([v * pos, -v * neg], dim=1)


class MaxMin(nn.Module):
    """Sorts channel pairs ``(x[:, :C/2], x[:, C/2:])`` into ``(max, min)``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.linearize(x)[0]

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        if x.shape[1] % 2:
            raise ConfigError(f"MaxMin needs an even number of channels, got {x.shape[1]}; use an even width")
        a, b = x.chunk(2, dim=1)
        keep = (a >= b).to(x.dtype)

        def jvp(v: Tensor) -> Tensor:
            va, vb = v.chunk(2, dim=1)
            return torch.cat([keep * va + (1 - keep) * vb, keep * vb + (1 - keep) * va], dim=1)

        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1), jvp


class ELU(ElementwiseActivation):
    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.expm1(x.clamp_max(0))
        return torch.where(x > 0, x, e), torch.where(x > 0, torch.ones_like(x), e + 1)


class Softplus(ElementwiseActivation):
    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.softplus(x), torch.sigmoid(x)


class Sin(ElementwiseActivation):
    """``sin(2 pi x) / (2 pi)``: 1-Lipschitz with a non-vanishing second derivative."""

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = 2 * math.pi * x
        return torch.sin(t) / (2 * math.pi), torch.cos(t)


class Identity(ElementwiseActivation):
    def forward(self, x: Tensor) -> Tensor:
        return x

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        return x, lambda v: v


class Pila(ElementwiseActivation):
    """Pila_k (see the module docstring): identity for z > 0, ``(k^2/2 z^3 - k z^2 + z) e^{kz}`` for
    z <= 0.  ``k`` is a fixed positive float (not learnable)."""

    #: ``t = k z`` is clamped to ``>= -T`` in the negative branch and the value and slope are set to 0
    #: below it: at T = 60 they are below 2e-21 in size (``|t^3 e^t| / 2k``), and cutting there keeps every
    #: intermediate a normal float -- subnormal results (e^t under 1e-38 in float32) make CPU arithmetic,
    #: and every layer that consumes them, over 100x slower.  The clamp also keeps ``-inf`` inputs from
    #: making ``0 * inf = NaN`` and, in float16 (T = 20), the backward's ``t^3`` factors from overflowing.
    _T_MIN = 60.0
    _T_MIN_HALF = 20.0

    def __init__(self, k: float = 5.0):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
            raise ConfigError(
                f"Pila: k must be a finite number > 0 (it sets the decay rate e^(kz) on z < 0), "
                f"got {k!r}; use the default k=5"
            )
        self.k = float(k)

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # negative branch on t = k z, set to 0 where z > 0 (finite there, and zero gradient), so
        # torch.where never mixes an inf/NaN gradient into the other side.  (A ``clamp_max(0)`` would do
        # the same, but its backward is zero at the boundary z = 0 itself, which would lose Pila'(0) = 1.)
        pos = x > 0
        t_min = self._T_MIN if torch.finfo(x.dtype).max > 1e30 else self._T_MIN_HALF
        t = torch.where(pos, torch.zeros_like(x), self.k * x).clamp_min(-t_min)
        e = torch.exp(t)
        et = e * t  # bounded: |t^n e^t| <= (n/e)^n on t <= 0, so no product below overflows
        et2 = et * t
        et3 = et2 * t
        neg_value = (0.5 * et3 - et2 + et) / self.k
        neg_slope = e - et + 0.5 * et2 + 0.5 * et3
        live = t > -t_min
        zero = torch.zeros_like(x)
        neg_value, neg_slope = torch.where(live, neg_value, zero), torch.where(live, neg_slope, zero)
        return torch.where(pos, x, neg_value), torch.where(pos, torch.ones_like(x), neg_slope)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class CPila(nn.Module):
    """Concatenated Pila along dim 1: ``[Pila_5(x - 0.2), Pila_5(-x - 0.2)] / 1.06`` (``C -> 2C``).

    The constants are fixed (class attributes) because the Lipschitz bound ``0.99889`` (module
    docstring) was verified for exactly these values."""

    k = 5.0
    shift = 0.2
    scale = 1.06
    channel_multiplier = 2

    def __init__(self):
        super().__init__()
        self.pila = Pila(self.k)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.pila(x - self.shift), self.pila(-x - self.shift)], dim=1) / self.scale

    def linearize(self, x: Tensor) -> tuple[Tensor, Jvp]:
        y1, d1 = self.pila.value_and_derivative(x - self.shift)
        y2, d2 = self.pila.value_and_derivative(-x - self.shift)
        y = torch.cat([y1, y2], dim=1) / self.scale
        return y, lambda v: torch.cat([v * d1, -v * d2], dim=1) / self.scale


LIPSCHITZ_ACTIVATIONS = {
    "lipswish": LipSwish,
    "swish": LipSwish,
    "clipswish": CLipSwish,
    "pila": Pila,
    "cpila": CPila,
    "crelu": CReLU,
    "maxmin": MaxMin,
    "elu": ELU,
    "softplus": Softplus,
    "sin": Sin,
    "identity": Identity,
}


def _activation_class(name: str) -> type:
    try:
        return LIPSCHITZ_ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown Lipschitz activation {name!r}; choose one of {sorted(LIPSCHITZ_ACTIVATIONS)}"
        ) from None


def lipschitz_activation(name: str) -> nn.Module:
    """Build a 1-Lipschitz activation by name (see ``LIPSCHITZ_ACTIVATIONS``)."""
    return _activation_class(name)()


def channel_multiplier(name: str) -> int:
    """How many output channels an activation makes per input channel: the class attribute
    ``channel_multiplier`` (2 for the concatenating CLipSwish and CPila), else 1."""
    return int(getattr(_activation_class(name), "channel_multiplier", 1))
