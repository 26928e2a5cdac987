"""Flow models on manifolds: stacks of spherical or simplex transforms over a manifold base distribution.

For data ``x`` on a manifold M (the unit sphere S^{d-1} or the probability simplex) and a bijection
``f: M -> M`` built from :mod:`flowforge.flows.sphere` or :mod:`flowforge.flows.simplex` layers,

    log p(x) = log p_Z(f(x)) + log R_f(x),      R_f(x) = dvol_M(f(x)) / dvol_M(x),

a density w.r.t. the manifold's surface measure (``R`` multiplies along a chain like a Jacobian
determinant, so :class:`~flowforge.flows.base.Compose` sums the log-ratios).  :class:`ManifoldFlow` is the
:class:`~flowforge.flows.model.Flow` that checks a batch lies on M (``| ||x|| - 1 | <= tol`` on the sphere,
``p_i > 0`` and ``|sum p - 1| <= tol`` on the simplex, ``tol = 1e-4`` so float32 data pass) and then
projects it exactly onto M (``x / ||x||``, ``p / sum p``: the identity on M with the identity as its
tangent-space derivative, so the log-ratios are unchanged).

``model=sphere`` builds :func:`SphereFlow`; ``model=simplex`` builds :func:`SimplexFlow`.  Both refuse
(:class:`~flowforge.errors.ConfigError`) a dataset that is not on their manifold (``dataset.manifold``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError, DataError
from flowforge.flows.base import Compose, Transform
from flowforge.flows.context import unconditional_only
from flowforge.flows.manifold_distributions import Dirichlet, UniformSphere, VonMisesFisher
from flowforge.flows.model import Flow
from flowforge.flows.registry import register_family
from flowforge.flows.simplex import Calibration, GeneralizedCalibration
from flowforge.flows.sphere import NormalizedAffine, NormalizedLinear, NormalizedTranslation

SPHERE_KINDS = {"translation": NormalizedTranslation, "linear": NormalizedLinear, "affine": NormalizedAffine}
SPHERE_BASES = ("vmf", "uniform")
SIMPLEX_KINDS = {"calibration": Calibration, "generalized": GeneralizedCalibration}
SIMPLEX_BASES = ("dirichlet",)
_DATASETS = {"sphere": "vmf_sphere", "simplex": "dirichlet_simplex"}
_WHERE = {"sphere": "the unit sphere", "simplex": "the probability simplex"}


def check_on_manifold(x: Tensor, manifold: str, tol: float = 1e-4, what: str = "the batch") -> None:
    """Raise :class:`DataError` unless every row of ``x`` lies on ``manifold`` within ``tol``.

    Eagerly the check reads its verdict on the host (one synchronisation) to name the first bad example; inside
    a compiled step it is a device-side assertion (``torch._assert_async``: no host read, the step fails with the
    manifold's message)."""
    if manifold not in _WHERE:
        raise ConfigError(f"unknown manifold '{manifold}'; choose 'sphere' or 'simplex'")
    if torch.compiler.is_compiling():
        if manifold == "sphere":
            ok = ((x.norm(dim=1) - 1).abs() <= tol).all()
        else:
            ok = (x > 0).all() & ((x.sum(1) - 1).abs() <= tol).all()
        torch._assert_async(ok, f"{what} has points off {_WHERE[manifold]} (tolerance {tol:g})")
        return
    if manifold == "sphere":
        dev = (x.norm(dim=1) - 1).abs()
        bad = ~(dev <= tol)
        if bad.any():  # host sync: eager input validation (compiled steps assert on the device above)
            i = int(bad.nonzero()[0])
            raise DataError(
                f"{what} has {int(bad.sum())} points off the unit sphere (first: example {i} with norm "
                f"{float(x[i].norm()):.6g}; tolerance {tol:g}); normalise each point to unit length, x / ||x||"
            )
    elif manifold == "simplex":
        nonpos = ~(x > 0).all(1)
        if nonpos.any():  # host sync: eager input validation (compiled steps assert on the device above)
            i = int(nonpos.nonzero()[0])
            raise DataError(
                f"{what} has {int(nonpos.sum())} points with non-positive entries (first: example {i}, "
                f"min {float(x[i].min()):.6g}); simplex points need p_i > 0: drop them or smooth, e.g. "
                f"(p + eps) / (1 + n eps)"
            )
        dev = (x.sum(1) - 1).abs()
        bad = ~(dev <= tol)
        if bad.any():  # host sync: eager input validation (compiled steps assert on the device above)
            i = int(bad.nonzero()[0])
            raise DataError(
                f"{what} has {int(bad.sum())} points whose entries do not sum to 1 (first: example {i} with sum "
                f"{float(x[i].sum()):.6g}; tolerance {tol:g}); normalise each point, p / sum(p)"
            )
    else:
        raise ConfigError(f"unknown manifold '{manifold}'; choose 'sphere' or 'simplex'")


def project(x: Tensor, manifold: str) -> Tensor:
    """``x / ||x||`` (sphere) or ``p / sum p`` (simplex)."""
    if manifold == "sphere":
        return x / x.norm(dim=1, keepdim=True)
    return x / x.sum(1, keepdim=True)


class ManifoldFlow(Flow):
    """A :class:`Flow` whose data and base live on ``manifold`` (``"sphere"`` or ``"simplex"``)."""

    def __init__(
        self, transform: Transform, base: nn.Module, data_shape: Sequence[int], manifold: str, tol: float = 1e-4
    ):
        super().__init__(transform, base, data_shape)
        self.manifold = manifold
        self.tol = tol

    def _forward(self, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        check_on_manifold(x, self.manifold, self.tol)
        return self.transform(project(x, self.manifold))


def _check_manifold(model: str, expected: str, manifold: str | None) -> None:
    if manifold != expected:
        got = "a dataset without manifold: " + expected if manifold is None else f"a dataset with manifold: {manifold}"
        raise ConfigError(
            f"model={model} models data on {_WHERE[expected]}; use dataset={_DATASETS[expected]} (got {got})"
        )


def _manifold_dim(model: str, shape: Sequence[int], minimum: int = 2) -> int:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 1 or shape[0] < minimum:
        raise ConfigError(
            f"model={model} needs vector data of shape [d] with d >= {minimum} (points in R^d), got shape {list(shape)}"
        )
    return shape[0]


def _check_layers(num_layers: int, model: str, minimum: int = 1) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < minimum:
        raise ConfigError(f"model.num_layers of model={model} must be an integer >= {minimum}, got {num_layers!r}")
    return num_layers


@torch.no_grad()
def _jitter(layer: nn.Module, scale: float) -> None:
    """Move the layer's parameters off the identity by ``scale * N(0, 1)`` (breaks the symmetry of a stack)."""
    if scale:
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))


def _layer_stack(
    manifold: str,
    shape: Sequence[int],
    data_manifold: str | None,
    num_layers: int,
    kind: str,
    kinds: dict,
    base: str,
    bases: tuple,
    init_scale: float,
) -> tuple[int, Compose]:
    """Check a manifold model's options and build its ``num_layers`` jittered ``kind`` layers."""
    _check_manifold(manifold, manifold, data_manifold)
    dim = _manifold_dim(manifold, shape)
    _check_layers(num_layers, manifold)
    if kind not in kinds:
        raise ConfigError(f"unknown {manifold} flow kind '{kind}'; set model.kind to one of {', '.join(kinds)}")
    if base not in bases:
        raise ConfigError(f"unknown {manifold} base '{base}'; set model.base to one of {', '.join(bases)}")
    layers = []
    for _ in range(num_layers):
        layer = kinds[kind](dim)
        _jitter(layer, init_scale)
        layers.append(layer)
    return dim, Compose(layers)


def SphereFlow(
    shape: Sequence[int],
    num_layers: int = 4,
    kind: str = "affine",
    base: str = "vmf",
    manifold: str | None = None,
    kappa: float = 1.0,
    learn_base: bool = True,
    init_scale: float = 0.1,
    context: Any = None,
    context_net: Any = None,
) -> ManifoldFlow:
    """``model=sphere``: ``num_layers`` normalised ``kind`` (translation | linear | affine) layers on S^{d-1},
    ``d = shape[0]``, over a ``base`` (vmf: learned vMF starting at ``kappa``; uniform) distribution.
    Layers start at ``identity + init_scale * noise``."""
    unconditional_only("sphere", context, context_net)
    d, layers = _layer_stack("sphere", shape, manifold, num_layers, kind, SPHERE_KINDS, base, SPHERE_BASES, init_scale)
    dist = VonMisesFisher(d, kappa=kappa, learn=learn_base) if base == "vmf" else UniformSphere(d)
    return ManifoldFlow(layers, dist, (d,), "sphere")


def SimplexFlow(
    shape: Sequence[int],
    num_layers: int = 1,
    kind: str = "calibration",
    base: str = "dirichlet",
    manifold: str | None = None,
    concentration: float | Sequence[float] = 1.0,
    learn_base: bool = True,
    init_scale: float = 0.1,
    context: Any = None,
    context_net: Any = None,
) -> ManifoldFlow:
    """``model=simplex``: ``num_layers`` ``kind`` (calibration | generalized) transforms on the simplex in
    R^n, ``n = shape[0]``, over a learned Dirichlet base starting at ``concentration``.  Each family is a
    group under composition, so one layer is as expressive as a stack (more layers only reparametrise)."""
    unconditional_only("simplex", context, context_net)
    n, layers = _layer_stack(
        "simplex", shape, manifold, num_layers, kind, SIMPLEX_KINDS, base, SIMPLEX_BASES, init_scale
    )
    return ManifoldFlow(layers, Dirichlet(n, concentration, learn=learn_base), (n,), "simplex")


__all__ = [
    "ManifoldFlow",
    "SphereFlow",
    "SimplexFlow",
    "check_on_manifold",
    "project",
    "SPHERE_KINDS",
    "SIMPLEX_KINDS",
]

register_family(
    SphereFlow,
    "sphere",
    title="Flow on the sphere: normalised translation, linear and affine layers",
    data=("sphere",),
    min_dim=2,
    test=("model.num_layers=2",),
)
register_family(
    SimplexFlow,
    "simplex",
    title="Calibration flow on the probability simplex",
    data=("simplex",),
    min_dim=2,
)
