"""Conditional flow matching (Lipman et al., 2023; rectified flow, Liu et al., 2023) for a CNF block.

Simulation-free training of the velocity field with the linear (optimal-transport, ``sigma_min = 0``)
probability path, written in our time convention (t = 0 data, t = T base):

    x_t = (1 - t/T) x + (t/T) eps,     eps ~ N(0, I),   t ~ U(0, T),
    u_t = d x_t / dt = (eps - x) / T,
    loss(x) = || v(x_t, t) - u_t ||^2       (summed over dimensions, one value per sample).

Its minimiser is the marginal velocity that carries the data distribution at t = 0 to N(0, I) at t = T, so
the trained CNF's forward ODE maps data to the base and its likelihood can be evaluated as for any CNF.
``T`` is read from the CNF and treated as a constant (a learnable T is not trained by this loss: use
``model.train_t1=false``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError, DataError
from flowforge.flows.base import Compose
from flowforge.flows.cnf import CNF
from flowforge.flows.multiscale import Reshape, Squeeze

SINGLE_CNF_HINT = (
    "objective=flow_matching trains one velocity field: use model=cnf with model.num_blocks=1 "
    "(and model.num_scales=1 for images), augment_dim=0"
)


def flow_matching_loss(cnf: CNF, x: Tensor, t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """Per-sample conditional flow matching loss ``||v(x_t, t) - (eps - x)/T||^2``, shape ``(B,)``.

    ``x``: a batch in the CNF's input space ``(B, *cnf.shape)``; ``t``: ``(B,)`` times in ``[0, T]`` (drawn
    uniformly when None); ``noise``: ``eps`` shaped like ``x`` (drawn from N(0, I) when None)."""
    if cnf.augment_dim:
        raise ConfigError(SINGLE_CNF_HINT)
    if tuple(x.shape[1:]) != cnf.shape:
        raise DataError(f"flow matching: the CNF expects inputs of shape (batch, {cnf.shape}), got {tuple(x.shape)}")
    b = x.shape[0]
    big_t = cnf.end_time(x.dtype, x.device).detach()
    if t is None:
        t = torch.rand(b, dtype=x.dtype, device=x.device) * big_t
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(b)
    eps = torch.randn_like(x) if noise is None else noise
    frac = (t / big_t).reshape(b, *([1] * (x.dim() - 1)))
    x_t = (1 - frac) * x + frac * eps
    target = (eps - x) / big_t
    return (cnf.velocity(t, x_t) - target).reshape(b, -1).pow(2).sum(1)


def _locate(flow: nn.Module) -> tuple[CNF, list]:
    """The single CNF of ``flow`` and the zero-log-det reshapes applied before it."""
    transform = getattr(flow, "transform", flow)
    layers = list(transform.transforms) if isinstance(transform, Compose) else [transform]
    flat: list = []
    while layers:  # flatten nested Compose
        layer = layers.pop(0)
        if isinstance(layer, Compose):
            layers = list(layer.transforms) + layers
        else:
            flat.append(layer)
    cnfs = [m for m in flat if isinstance(m, CNF)]
    others_ok = all(isinstance(m, (CNF, Reshape, Squeeze)) for m in flat)
    if len(cnfs) != 1 or not others_ok or cnfs[0].augment_dim:
        raise ConfigError(SINGLE_CNF_HINT)
    index = flat.index(cnfs[0])
    return cnfs[0], flat[:index]


def single_cnf(flow: nn.Module) -> CNF:
    """The one CNF block of a flow whose transform is a single CNF (possibly wrapped in zero-log-det
    reshapes); ConfigError for multi-block, multiscale or augmented models."""
    return _locate(flow)[0]


def cnf_inputs(flow: nn.Module, x: Tensor) -> Tensor:
    """``x`` (continuous data, dequantised images in [0, 1]) mapped to the input space of the flow's single
    CNF: the flow's preprocessing (e.g. the logit transform, log-det ignored) and any reshape before it."""
    _, before = _locate(flow)
    preprocess = getattr(flow, "preprocess", None)
    if preprocess is not None:
        x = preprocess(x)[0]
    for layer in before:
        x = layer(x)[0]
    return x


def flow_matching_flow_loss(flow: nn.Module, x: Tensor, t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """:func:`flow_matching_loss` of the flow's single CNF on a data batch ``x`` (see :func:`cnf_inputs`)."""
    return flow_matching_loss(single_cnf(flow), cnf_inputs(flow, x), t, noise)
