"""Data for reverse-KL runs: exact samples of an unnormalised target ``p~ = Z p`` (see :mod:`flowforge.targets`).

Reverse KL trains on ``E_q[log q(x) - log p~(x)]`` with ``x ~ q`` and needs no data, only ``.target``.
The splits are nevertheless exact draws ``x ~ p`` (each split from its own fixed seed), so the same data
module serves maximum likelihood and forward-KL evaluation of a reverse-KL fit: on test samples,

    -E_p[log q(x)] = KL(p || q) + H(p),

and ``H(p) = -E_p[log p~(x)] + log Z`` is known up to Monte Carlo error from the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowforge.data.base import FlowDataModule
from flowforge.errors import ConfigError
from flowforge.targets import TARGETS, make_target


class TargetDataModule(FlowDataModule):
    """Exact samples of the target ``name`` on R^dim; ``.target`` is the target object.

    Target options (``num_components``, ``radius``, ``std``, ``curvature``, ``scale``, ``log_constant``)
    left ``None`` take the target's defaults; setting one that does not apply to ``name`` is a
    :class:`ConfigError`.
    """

    def __init__(
        self,
        name: str = "mixture2d",
        dim: int = 2,
        shape: Sequence[int] | None = None,
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 2000,
        num_components: int | None = None,
        radius: float | None = None,
        std: float | None = None,
        curvature: float | None = None,
        scale: float | None = None,
        log_constant: float | None = None,
        **kwargs,
    ):
        if name not in TARGETS:
            raise ConfigError(f"unknown target '{name}'; dataset.name must be one of {sorted(TARGETS)}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ConfigError(f"dataset.dim must be an integer >= 2, got {dim!r}")
        shape = [dim] if shape is None else [int(s) for s in shape]
        if shape != [dim]:
            raise ConfigError(
                f"dataset.shape={shape} does not match dataset.dim={dim} of target '{name}'; "
                f"set dataset.shape=[{dim}] (the config's default ${{dataset.dim}} interpolation does this)"
            )
        for key in ("num_levels", "logit_alpha"):
            if kwargs.get(key) is not None:
                raise ConfigError(
                    f"target densities are continuous vectors, but dataset.{key}={kwargs[key]!r}; set it to null"
                )
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"dataset.{key} must be a positive integer, got {n!r}")
        self.target = make_target(
            name,
            dim,
            num_components=num_components,
            radius=radius,
            std=std,
            curvature=curvature,
            scale=scale,
            log_constant=log_constant,
        )
        super().__init__(shape=shape, name=name, **kwargs)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}

    def load_splits(self):
        out = {}
        for i, (split, n) in enumerate(self.sizes.items()):
            g = torch.Generator().manual_seed(self.seed * 3 + i)
            out[split] = (self.target.sample(n, generator=g), None)
        return out
