"""Typed options of the contractive families (Residual, Implicit and Monotone Flows) and their config keys.

A family takes its options in groups, each a frozen dataclass whose fields hold the Python defaults:

- :class:`flowforge.nn.contractive.GNet`: the g network (kind, activation, bound, sizes);
- :class:`flowforge.nn.contractive.Lipschitz`: how the layers of g are normalised (norm, power iteration);
- :class:`Stack`: the architecture around the blocks (:func:`flowforge.flows.contractive_stack.contractive_stack`);
- :class:`Solvers`: the root-finding solves of each block and the failure policy;
- the log-det estimate is the ``estimator`` argument itself (:class:`flowforge.estimators.LogDetEstimator`).

The model configs (``conf/model/<family>.yaml``) are flat: each of their keys names one field of one group
(:func:`config_keys`), and a family sets the keys it is given on its groups with :func:`with_config`.  So
``ResidualFlow(shape, g=GNet(hidden=(64, 64)), stack=Stack(num_blocks=4))`` and
``ResidualFlow(shape, hidden=[64, 64], num_blocks=4)`` build the same model.  A group passed whole
replaces the family's default group (``MonotoneFlow(shape, g=GNet(...))`` starts from :class:`GNet`'s
defaults, not from ``MONOTONE_G``); a config key changes one field of the family's default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from flowforge.nn.contractive import GNet, Lipschitz
from flowforge.solvers.solver import SolverSpec

__all__ = ["GNet", "Lipschitz", "Solvers", "Stack", "as_config", "config_keys", "g_net", "with_config"]


@dataclass(frozen=True)
class Stack:
    """The blocks' arrangement; the defaults are Residual Flows' image models (Chen et al., 2019).

    - Vectors: ``num_blocks`` blocks.
    - Images: ``blocks_per_scale`` blocks at each scale with a squeeze between scales (``squeeze_first``:
      one more before the first; ``factor_out``: half the channels leave at each squeeze between scales),
      then ``fc_blocks`` fully connected blocks on the flattened tensor.
    - ``actnorm``: ActNorm before the first block and after every block.
    """

    num_blocks: int = 10
    blocks_per_scale: Sequence[int] = (16, 16, 16)
    fc_blocks: int = 4
    actnorm: bool = True
    squeeze_first: bool = False
    factor_out: bool = False


@dataclass(frozen=True)
class Solvers:
    """The fixed-point solves of each block (config keys ``forward_solver``, ``inverse_solver``,
    ``backward_solver``, ``on_fail``).

    Each solve is a :data:`flowforge.solvers.solver.SolverSpec`: ``None`` (the block's default from
    :mod:`flowforge.solvers.presets`), a method name, a mapping of :class:`flowforge.solvers.Solver`
    options (the missing ones from the block's default) or a :class:`flowforge.solvers.Solver`.

    - ``forward``: the forward pass's solve (monotone: ``w + g(w) = sqrt(2) x``; implicit:
      ``z = a - g_z(z)``); residual blocks have none.
    - ``inverse``: the inverse's solve (residual: ``x = y - g(x)``; monotone: ``w - g(w) = sqrt(2) y``;
      implicit: ``x = a - g_x(x)``).
    - ``backward``: the adjoint of implicit differentiation, for the gradients through either solve.
    - ``on_fail``: ``warn`` or ``raise`` (:class:`flowforge.errors.ConvergenceError`) when samples do not
      converge.
    """

    forward: SolverSpec = field(default=None, metadata={"key": "forward_solver"})
    inverse: SolverSpec = field(default=None, metadata={"key": "inverse_solver"})
    backward: SolverSpec = field(default=None, metadata={"key": "backward_solver"})
    on_fail: str = "warn"

    def block_options(self) -> dict[str, Any]:
        """The keyword arguments of an implicit or monotone block: its three solves and ``on_fail``."""
        return {
            "forward_solver": self.forward,
            "inverse_solver": self.inverse,
            "backward_solver": self.backward,
            "on_fail": self.on_fail,
        }


def config_keys(**groups: object) -> dict[str, tuple[str, str]]:
    """``{config key: (group, field)}`` for the fields of the option groups given by name (a field's key is
    its name unless its metadata names another)."""
    return {f.metadata.get("key", f.name): (name, f.name) for name, group in groups.items() for f in fields(group)}


def with_config(config: Mapping[str, Any], **groups: Any) -> dict[str, Any]:
    """The option groups (given by name) with the flat config keys in ``config`` set on the fields they
    name; a key that names no field raises ``TypeError``, as an unknown keyword argument does."""
    owners = config_keys(**groups)
    unknown = sorted(set(config) - set(owners))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; the options are {sorted(owners)}")
    changes: dict[str, dict[str, Any]] = {name: {} for name in groups}
    for key, value in config.items():
        name, field_name = owners[key]
        changes[name][field_name] = value
    return {name: replace(group, **changes[name]) if changes[name] else group for name, group in groups.items()}


def as_config(**groups: object) -> dict[str, Any]:
    """The flat config (``{config key: value}``) of the option groups given by name: the inverse of
    :func:`with_config`."""
    return {key: getattr(groups[name], attr) for key, (name, attr) in config_keys(**groups).items()}


def g_net(g: GNet | str, default: GNet) -> GNet:
    """``g`` itself, or (a kind's name, the config's ``model.g=mlp|dense``) the family's ``default`` g
    network of that kind."""
    return replace(default, kind=g) if isinstance(g, str) else g
