"""A flow model: preprocessing, a transform and a base distribution over the whole data space.

``forward(x) = (z, log |det dz/dx|)`` through preprocessing (e.g. the logit transform) and the
transform; by the change of variables

    log p(x) = log p_Z(f(x)) + log |det df/dx|.

For images ``x`` lives in [0, 1]; :meth:`Flow.bits_per_dim` takes raw integer pixels, dequantises
them and reports ``-(log p(y) + log_weight) / (D log 2)`` where ``log_weight = -D log K`` for
uniform dequantisation (a bound on the discrete model's bits per dimension).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError, DataError
from flowforge.flows.base import Compose, Transform
from flowforge.flows.context import ContextEmbedding, context_features
from flowforge.flows.distributions import make_base
from flowforge.flows.preprocessing import Logit, UniformDequantization


class Flow(Transform):
    """A flow model (module docstring).  A conditional model (``context``: its
    :class:`~flowforge.flows.context.ContextEmbedding`) models ``p(x | c)``: every method takes the raw context ``c``
    (one per example; :meth:`sample` also takes one context for all samples), embeds it once and hands the features
    to every layer and to a conditional base.  An unconditional model refuses a context, a conditional one needs it.
    """

    def __init__(
        self,
        transform: Transform,
        base: nn.Module,
        data_shape: Sequence[int],
        preprocess: Transform | None = None,
        dequantizer: nn.Module | None = None,
        context: ContextEmbedding | None = None,
    ):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.preprocess = preprocess
        self.transform = transform
        self.base = base
        self.dequantizer = dequantizer
        self.context = context
        if getattr(base, "conditional", False) and context is None:
            raise ConfigError("a conditional base distribution needs a conditional model (model.context)")

    @property
    def dim(self) -> int:
        return math.prod(self.data_shape)

    @property
    def is_image(self) -> bool:
        return self.dequantizer is not None

    @property
    def conditional(self) -> bool:
        """Whether the model is ``p(x | c)`` (needs a context) rather than ``p(x)``."""
        return self.context is not None

    def check_input(self, x: Tensor) -> None:
        """Raise a :class:`DataError` when ``x`` does not have shape ``(B, *data_shape)``."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise DataError(
                f"the model expects inputs of shape (batch, {', '.join(map(str, self.data_shape))}), got "
                f"{tuple(x.shape)}; the model was built for another dataset shape"
            )

    def embed(self, context: Any, batch: int | None) -> Tensor | None:
        """The context features every layer reads, ``(batch, features)``, or None for an unconditional model; a clear
        error for a missing context, a context given to an unconditional model, or a context of the wrong shape."""
        if self.context is None:
            if context is not None:
                raise DataError(
                    "this model is unconditional but was given a context; train a conditional model "
                    "(dataset.conditional=true, or a dataset with a context) to condition on it"
                )
            return None
        if context is None:
            raise DataError(f"this model is conditional: pass a context, {self.context.describe()}")
        return self.context(self.context.check(context, batch), self._dtype())

    def _dtype(self) -> torch.dtype:
        p = next(self.transform.parameters(), None)
        return torch.get_default_dtype() if p is None else p.dtype

    def _base_log_prob(self, z: Tensor, h: Tensor | None) -> Tensor:
        return (
            self.base.log_prob(z)
            if h is None or not getattr(self.base, "conditional", False)
            else (self.base.log_prob(z, h))
        )

    def _base_sample(self, n: int, temperature: float, h: Tensor | None) -> Tensor:
        if h is not None and getattr(self.base, "conditional", False):
            return self.base.sample(n, temperature, h)
        return self.base.sample(n, temperature)

    def _forward(self, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.preprocess is None:
            return self.transform(x) if h is None else self.transform(x, h)
        x, log_det = self.preprocess(x)
        z, ld = self.transform(x) if h is None else self.transform(x, h)
        return z, log_det + ld

    def _inverse(self, z: Tensor, h: Tensor | None) -> Tensor:
        x = self.transform.inverse(z) if h is None else self.transform.inverse(z, h)
        return x if self.preprocess is None else self.preprocess.inverse(x)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._forward(x, self.embed(context, x.shape[0]))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self._inverse(z, self.embed(context, z.shape[0]))

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` (``log p(x | c)`` given ``context``) per sample in nats (x continuous, in [0, 1] for
        images)."""
        self.check_input(x)
        h = self.embed(context, x.shape[0])
        z, log_det = self._forward(x, h)
        return self._base_log_prob(z, h) + log_det

    def sample_context(self, n: int, context: Any) -> Tensor | None:
        """``context`` for ``n`` samples: one per sample (``(n, ...)``) as given, or one context (a label, or one
        vector of the context's shape) repeated ``n`` times; None for an unconditional model without one."""
        if self.context is None or context is None:
            return context
        c = context if isinstance(context, Tensor) else torch.as_tensor(context)
        if c.dim() == len(self.context.raw_shape):  # one context for every sample
            c = c.unsqueeze(0).expand(n, *c.shape)
        return c

    def _embed_for_sampling(self, n: int, context: Any) -> Tensor | None:
        c = self.sample_context(n, context)
        if isinstance(c, Tensor) and self.context is not None:
            device = self.context.eye.device if self.context.classes is not None else None
            c = c.to(device or next(self.parameters()).device)
        return self.embed(c, n)

    def check_sample_context(self, context: Any) -> None:
        """A number given as the context of an unconditional model is a temperature passed by position: a TypeError
        that says so."""
        if isinstance(context, (float, int)) and not isinstance(context, bool) and self.context is None:
            raise TypeError(
                f"sample(n, context=None, temperature=1.0) got context={context!r} for an unconditional "
                "model; pass the temperature by keyword: sample(n, temperature=...)"
            )

    @torch.no_grad()
    def sample(self, n: int, context: Any = None, temperature: float = 1.0) -> Tensor:
        """``n`` samples ``f^{-1}(z; c)``, ``z ~ p_Z(. | c)`` with its standard deviation scaled by ``temperature``;
        ``context``: one per sample or one for all ``n`` (conditional models)."""
        self.check_sample_context(context)
        h = self._embed_for_sampling(n, context)
        return self._inverse(self._base_sample(n, temperature, h), h)

    def rsample_and_log_prob(self, n: int, context: Any = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``x = f^{-1}(z)``, ``z ~ p_Z``, with their log-density

            log q(x) = log p_Z(z) - log |det d f^{-1}/dz|,

        differentiable in the parameters along the sampling path (reparameterisation): the gradient
        estimator of reverse-KL / variational inference.  Needs a transform whose
        ``inverse_and_log_det`` is differentiable (closed-form or implicitly differentiated inverses).
        ``context`` as for :meth:`sample`.
        """
        h = self._embed_for_sampling(n, context)
        z = self._base_sample(n, 1.0, h)
        log_q = self._base_log_prob(z, h)
        x, log_det = self.transform.inverse_and_log_det(z) if h is None else self.transform.inverse_and_log_det(z, h)
        if self.preprocess is not None:
            x, ld = self.preprocess.inverse_and_log_det(x)
            log_det = log_det + ld
        return x, log_q - log_det

    def bits_per_dim(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Bits per dimension of integer-valued images ``x`` (levels 0..K-1), per sample."""
        if self.dequantizer is None:
            return -self.log_prob(x, context) / (self.dim * math.log(2))
        y, log_weight = self.dequantizer(x)
        return -(self.log_prob(y, context) + log_weight) / (self.dim * math.log(2))


def vector_dim(shape: Sequence[int], family: str) -> int:
    """The dimension of vector data, or a clear error for image data."""
    shape = tuple(shape)
    if len(shape) != 1:
        from flowforge.flows.registry import family_names

        raise ConfigError(
            f"model '{family}' acts on vector data, but the dataset has image shape {shape}; "
            f"use an image-capable model ({family_names(lambda f: f.images)}) or a vector dataset"
        )
    return shape[0]


def build_flow(
    shape: Sequence[int],
    transform: Transform,
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    context: ContextEmbedding | None = None,
) -> Flow:
    """Wrap a transform into a :class:`Flow` for data of ``shape``.

    Image data (``len(shape) == 3``) get uniform dequantisation with ``num_levels`` and the logit
    transform with ``logit_alpha``; the base distribution lives on the flat ``prod(shape)`` space.
    ``context``: the embedding of a conditional model (:func:`flowforge.flows.context.make_context`).
    """
    shape = tuple(int(s) for s in shape)
    preprocess, dequantizer = None, None
    if len(shape) == 3:
        if num_levels is None or logit_alpha is None:
            raise ConfigError(
                f"image data of shape {shape} need num_levels and logit_alpha (set them in the dataset config)"
            )
        preprocess, dequantizer = Logit(float(logit_alpha)), UniformDequantization(int(num_levels))
    elif len(shape) != 1:
        raise ConfigError(f"data must be vectors (D,) or images (C, H, W); got shape {shape}")
    base_dist = make_base(base, (math.prod(shape),), context_features(context))
    return Flow(transform, base_dist, shape, preprocess, dequantizer, context)


def flatten_images(shape: Sequence[int], layers: list) -> Transform:
    """``Compose(layers)``, preceded by a flatten for image data (for flows that act on vectors)."""
    from flowforge.flows.multiscale import Reshape

    shape = tuple(shape)
    if len(shape) == 3:
        layers = [Reshape(shape, (math.prod(shape),))] + list(layers)
    return Compose(layers)
