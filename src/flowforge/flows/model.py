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

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError, DataError
from flowforge.flows.base import Compose, Transform
from flowforge.flows.distributions import DiagonalGaussian, make_base
from flowforge.flows.preprocessing import Logit, UniformDequantization


class Flow(Transform):
    def __init__(
        self,
        transform: Transform,
        base: DiagonalGaussian,
        data_shape: Sequence[int],
        preprocess: Transform | None = None,
        dequantizer: nn.Module | None = None,
    ):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.preprocess = preprocess
        self.transform = transform
        self.base = base
        self.dequantizer = dequantizer

    @property
    def dim(self) -> int:
        return math.prod(self.data_shape)

    @property
    def is_image(self) -> bool:
        return self.dequantizer is not None

    def check_input(self, x: Tensor) -> None:
        """Raise a :class:`DataError` when ``x`` does not have shape ``(B, *data_shape)``."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise DataError(
                f"the model expects inputs of shape (batch, {', '.join(map(str, self.data_shape))}), got "
                f"{tuple(x.shape)}; the model was built for another dataset shape"
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.preprocess is None:
            return self.transform(x)
        x, log_det = self.preprocess(x)
        z, ld = self.transform(x)
        return z, log_det + ld

    def inverse(self, z: Tensor) -> Tensor:
        x = self.transform.inverse(z)
        return x if self.preprocess is None else self.preprocess.inverse(x)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` per sample in nats (x continuous, in [0, 1] for images)."""
        self.check_input(x)
        z, log_det = self(x)
        return self.base.log_prob(z) + log_det

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``n`` samples ``f^{-1}(z)``, ``z ~ p_Z`` with its standard deviation scaled by ``temperature``."""
        return self.inverse(self.base.sample(n, temperature))

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` samples ``x = f^{-1}(z)``, ``z ~ p_Z``, with their log-density

            log q(x) = log p_Z(z) - log |det d f^{-1}/dz|,

        differentiable in the parameters along the sampling path (reparameterisation): the gradient
        estimator of reverse-KL / variational inference.  Needs a transform whose
        ``inverse_and_log_det`` is differentiable (closed-form or implicitly differentiated inverses).
        """
        z = self.base.sample(n)
        log_q = self.base.log_prob(z)
        x, log_det = self.transform.inverse_and_log_det(z)
        if self.preprocess is not None:
            x, ld = self.preprocess.inverse_and_log_det(x)
            log_det = log_det + ld
        return x, log_q - log_det

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """Bits per dimension of integer-valued images ``x`` (levels 0..K-1), per sample."""
        if self.dequantizer is None:
            return -self.log_prob(x) / (self.dim * math.log(2))
        y, log_weight = self.dequantizer(x)
        return -(self.log_prob(y) + log_weight) / (self.dim * math.log(2))


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
) -> Flow:
    """Wrap a transform into a :class:`Flow` for data of ``shape``.

    Image data (``len(shape) == 3``) get uniform dequantisation with ``num_levels`` and the logit
    transform with ``logit_alpha``; the base distribution lives on the flat ``prod(shape)`` space.
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
    return Flow(transform, make_base(base, (math.prod(shape),)), shape, preprocess, dequantizer)


def flatten_images(shape: Sequence[int], layers: list) -> Transform:
    """``Compose(layers)``, preceded by a flatten for image data (for flows that act on vectors)."""
    from flowforge.flows.multiscale import Reshape

    shape = tuple(shape)
    if len(shape) == 3:
        layers = [Reshape(shape, (math.prod(shape),))] + list(layers)
    return Compose(layers)
