"""FFJORD (Grathwohl et al., 2019): continuous normalizing flows with free-form velocity networks,

    log p(x) = log p_Z(z) + sum_k int_0^{T_k} tr(dv_k/dx (x_k(t), t)) dt,     z = x_K(T_K),

one term per CNF block (:mod:`flowforge.flows.cnf`), the trace exact or by Hutchinson's estimator.

- Vectors (2-D toys, tabular): ``num_blocks`` CNF blocks, each with a :class:`VelocityMLP` of widths
  ``hidden``.  ``augment_dim > 0`` makes the first block an augmented CNF (ANODE) and the rest act on the
  ``D + A`` dimensional state; the base distribution is then over ``D + A`` dimensions and ``log_prob`` is a
  stochastic lower bound on ``log p(x)``.
- Images (FFJORD's multiscale model, after RealNVP): logit preprocessing, then per scale
  ``blocks_per_scale`` CNF blocks at ``(C, H, W)``, a squeeze to ``(4C, H/2, W/2)``, ``blocks_per_scale``
  more CNF blocks, and half of the channels factored out to the base; the last scale has only its first
  ``blocks_per_scale`` blocks.  Each block's velocity is a :class:`VelocityConvNet` with ``len(kernels)``
  convolutions of width ``channels`` and the time as an extra channel.  ``num_scales=1`` is one scale of
  ``blocks_per_scale`` CNFs over the whole image (``blocks_per_scale=1``: the single image CNF that flow
  matching trains).

Conditional models ``p(x | c)`` (``context``): every block's velocity reads the embedded context,
``v(x, t, h)`` (:mod:`flowforge.nn.velocity`), as FFJORD's conditional variants do.

Settings: FFJORD's published results (MNIST 0.99, CIFAR-10 3.40 bits/dim) are in our reference table
(verified).  The architecture details above and in ``conf/experiment/ffjord_*.yaml`` are recalled from the
paper and its reference code, not verified against the PDF: concat layers, softplus, 64-channel
convolutions ("64,64,64" hidden), 2 CNF blocks before and after each squeeze, as many scales as halve the
image down to >= 4x4 (MNIST 3, CIFAR-10 4), dopri5 with atol = rtol = 1e-5, learnable T starting at 1.0,
Hutchinson's estimator (Rademacher probes in the image runs), adjoint gradients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from flowforge.errors import ConfigError
from flowforge.flows.base import Compose, Transform
from flowforge.flows.cnf import CNF
from flowforge.flows.context import context_features, make_context
from flowforge.flows.distributions import make_base
from flowforge.flows.model import Flow, build_flow
from flowforge.flows.multiscale import Squeeze, check_squeezable, multiscale
from flowforge.flows.registry import register_family
from flowforge.nn.velocity import VelocityConvNet, VelocityMLP

log = logging.getLogger("flowforge")

RESIDUAL_ONLY = ("roulette", "power_series", "mem_eff", "neumann_grad")
CNF_ESTIMATORS = ("exact", "hutchinson", "auto")


def cnf_trace_options(estimator: None | dict | Any, dim: int) -> dict:
    """The ``estimator`` config group as CNF trace options ``{trace, probe, n_probes[, eval_exact_max_dim]}``.

    ``exact`` | ``hutchinson`` | ``auto`` (exact for data of at most ``auto_exact_max_dim`` dimensions, else
    Hutchinson); the residual-flow estimators are refused.  Keys meant for residual flows (``n_exact_terms``,
    ``neumann_grad``, ...) are ignored, so the shared ``auto`` config works for every family."""
    if estimator is None:
        estimator = {"name": "auto"}
    if not isinstance(estimator, dict):
        try:  # an OmegaConf node or another mapping
            estimator = dict(estimator)
        except (TypeError, ValueError):
            raise ConfigError(
                f"a CNF takes the estimator config group (a dict with name exact|hutchinson|auto), got {estimator!r}"
            ) from None
    name = str(estimator.get("name", "auto"))
    if name in RESIDUAL_ONLY:
        raise ConfigError(
            f"estimator={name}: the series estimators (roulette, power_series and the mem_eff / neumann_grad "
            f"configs built on them) are for residual flows; CNFs take estimator=exact|hutchinson|auto"
        )
    if name not in CNF_ESTIMATORS:
        raise ConfigError(f"unknown CNF trace estimator '{name}'; choose estimator=exact|hutchinson|auto")
    if name == "auto":
        max_exact = int(estimator.get("auto_exact_max_dim", 2))
        name = "exact" if dim <= max_exact else "hutchinson"
        log.info("estimator=auto resolved to %s for %d-dimensional data (CNF trace)", name, dim)
    out = {
        "trace": name,
        "probe": str(estimator.get("probe", "gaussian")),
        "n_probes": int(estimator.get("n_probes", 1)),
    }
    if estimator.get("eval_exact_max_dim") is not None:
        out["eval_exact_max_dim"] = int(estimator["eval_exact_max_dim"])
    return out


def FFJORD(
    shape: Sequence[int],
    estimator: None | dict | Any = None,
    num_blocks: int = 1,
    hidden: Sequence[int] = (64, 64, 64),
    act: str = "softplus",
    channels: int = 64,
    kernels: Sequence[int] = (3, 3, 3),
    num_scales: int = 2,
    blocks_per_scale: int = 2,
    method: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    step_size: float | None = None,
    adjoint: bool = True,
    adjoint_atol: float | None = None,
    adjoint_rtol: float | None = None,
    adjoint_seminorm: bool = True,
    t1: float = 1.0,
    train_t1: bool = True,
    kinetic: float = 0.0,
    jacobian: float = 0.0,
    augment_dim: int = 0,
    base: str = "normal",
    num_levels: int | None = None,
    logit_alpha: float | None = None,
    eval_exact_max_dim: int = 2,
    eval_trace: str | None = None,
    max_num_steps: int | None = None,
    context: Any = None,
    context_net: Any = None,
) -> Flow:
    """A FFJORD model for data of ``shape`` (see the module docstring).  ``eval_exact_max_dim`` in the
    ``estimator`` dict, when given, overrides the argument of the same name."""
    emb = make_context(context, context_net)
    features = context_features(emb)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 3):
        raise ConfigError(f"FFJORD takes vectors (D,) or images (C, H, W); got shape {shape}")
    opts = cnf_trace_options(estimator, math.prod(shape))
    opts.setdefault("eval_exact_max_dim", int(eval_exact_max_dim))
    solver = dict(
        method=method,
        atol=atol,
        rtol=rtol,
        step_size=step_size,
        adjoint=adjoint,
        adjoint_atol=adjoint_atol,
        adjoint_rtol=adjoint_rtol,
        adjoint_seminorm=adjoint_seminorm,
        t1=t1,
        train_t1=train_t1,
        kinetic=kinetic,
        jacobian=jacobian,
        eval_trace=eval_trace,
        max_num_steps=max_num_steps,
        **opts,
    )
    if int(augment_dim) != augment_dim or augment_dim < 0:
        raise ConfigError(f"augment_dim must be an integer >= 0, got {augment_dim}")

    if len(shape) == 1:
        if int(num_blocks) < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
        d, a = shape[0], int(augment_dim)
        blocks = [
            CNF(
                VelocityMLP(d + a, hidden, act, features),
                dim=d if i == 0 else d + a,
                augment_dim=a if i == 0 else 0,
                **solver,
            )
            for i in range(int(num_blocks))
        ]
        flow = build_flow(shape, Compose(blocks), base, num_levels, logit_alpha, context=emb)
        if a:
            flow.base = make_base(base, (d + a,), features)
        return flow

    if augment_dim:
        raise ConfigError(
            f"augment_dim={augment_dim}: augmented CNFs are implemented for vector data only; the data have image "
            f"shape {shape}: set model.augment_dim=0"
        )
    if int(num_scales) < 1 or int(blocks_per_scale) < 1:
        raise ConfigError(f"num_scales and blocks_per_scale must be >= 1, got {num_scales} and {blocks_per_scale}")
    check_squeezable(shape, int(num_scales) - 1, "FFJORD")

    def cnf_blocks(s: tuple) -> list[Transform]:
        return [
            CNF(VelocityConvNet(s[0], channels, kernels, act, features), shape=s, **solver)
            for _ in range(int(blocks_per_scale))
        ]

    def make_scale(s: tuple, is_last: bool) -> tuple[list, tuple]:
        layers = cnf_blocks(s)
        if is_last:
            return layers, s
        s2 = (4 * s[0], s[1] // 2, s[2] // 2)
        return layers + [Squeeze()] + cnf_blocks(s2), s2

    return build_flow(shape, multiscale(shape, int(num_scales), make_scale), base, num_levels, logit_alpha, context=emb)


register_family(
    FFJORD,
    "cnf",
    title="FFJORD continuous flow (Grathwohl et al., 2019)",
    log_det="estimated",
    conditional=True,
    test=(
        "model.num_blocks=2",
        "model.hidden=[8]",
        "model.channels=4",
        "model.kernels=[3,3]",
        "model.num_scales=2",
        "model.blocks_per_scale=1",
        "model.method=rk4",
        "model.step_size=0.5",
    ),
    exact_test=(
        "estimator=exact",
        "model.method=dopri5",
        "model.step_size=null",
        "model.atol=1e-10",
        "model.rtol=1e-10",
        "model.adjoint=false",
    ),
    smoke={
        "num_blocks": 2,
        "hidden": [8],
        "channels": 4,
        "kernels": [3, 3],
        "blocks_per_scale": 1,
        "method": "rk4",
        "step_size": 0.5,
    },
)
