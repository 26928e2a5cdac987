"""Flows: the ``(z, log_det)`` transform contract, one module per family, and the model wrapper."""

from flowforge.flows.actnorm import ActNorm
from flowforge.flows.base import Compose, Inverse, Transform, initialize, refresh_ready
from flowforge.flows.cnf import CNF
from flowforge.flows.coupling import Coupling
from flowforge.flows.distributions import DiagonalGaussian, StandardNormal
from flowforge.flows.ffjord import FFJORD
from flowforge.flows.glow import Glow
from flowforge.flows.invconv import InvertibleLinearLU
from flowforge.flows.maf import IAF, MAF
from flowforge.flows.manifold_flow import SimplexFlow, SphereFlow
from flowforge.flows.model import Flow, build_flow
from flowforge.flows.nice import NICE
from flowforge.flows.nsf import NSF
from flowforge.flows.planar import Planar, planar_family
from flowforge.flows.radial import Radial, radial_family
from flowforge.flows.realnvp import RealNVP
from flowforge.flows.tarflow import TarFlow

__all__ = [
    "ActNorm",
    "CNF",
    "Compose",
    "Coupling",
    "DiagonalGaussian",
    "FFJORD",
    "Flow",
    "Glow",
    "IAF",
    "InvertibleLinearLU",
    "Inverse",
    "MAF",
    "NICE",
    "NSF",
    "Planar",
    "Radial",
    "RealNVP",
    "SimplexFlow",
    "SphereFlow",
    "StandardNormal",
    "TarFlow",
    "Transform",
    "build_flow",
    "initialize",
    "planar_family",
    "radial_family",
    "refresh_ready",
]
