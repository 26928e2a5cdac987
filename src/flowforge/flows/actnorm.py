"""Activation normalisation (Kingma & Dhariwal, Glow, 2018).

``z = (x + b) * exp(s)`` per channel, ``log |det| = (H W) sum_c s_c``.  With ``data_init`` the first
batch sets ``b = -mean`` and ``s = -1/2 log(max(var, min_var))`` so the output has zero mean and unit
variance per channel.  A first batch with fewer than ``MIN_INIT_VALUES`` (8) values per channel cannot estimate a
scale (one example has variance 0, which would give scales of ``1/sqrt(min_var)``): then only ``b`` is set, the
scales start at 1, and a warning says so.
Under ``torch.distributed`` the statistics are averaged over all ranks, so every
rank starts from the same parameters.  Whether the init happened is kept in the ``initialized`` buffer
(saved in checkpoints; a float so that weight averaging can copy it) and mirrored in the Python flag ``_ready``
(refreshed from the buffer when a state dict is loaded), so the forward branches on host state, never on a device
tensor; :func:`flowforge.flows.initialize` runs the init eagerly before a compiled training step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowforge.flows.base import Transform

log = logging.getLogger("flowforge")

#: fewest values per channel (batch x spatial positions, over all ranks) from which the init estimates a scale
MIN_INIT_VALUES = 8


def _warn_small_init(batch: int, n: int) -> None:
    log.warning(
        "ActNorm's data-dependent initialisation got a first batch of %d example(s) (%d values per channel), too few "
        "to estimate a scale (at least %d are needed: one example has variance 0, which would set scales of 100): "
        "the scales start at 1 and only the shift is taken from the data; use a larger dataset.batch_size (e.g. 64)",
        batch,
        n,
        MIN_INIT_VALUES,
    )


def _refresh_ready(module: ActNorm, incompatible_keys) -> None:
    module.refresh_ready()


class ActNorm(Transform):
    def __init__(self, shape: Sequence[int], data_init: bool = True, min_var: float = 1e-4):
        super().__init__()
        shape = tuple(shape)
        param_shape = (shape[0],) + (1,) * (len(shape) - 1)
        self.spatial = 1
        for s in shape[1:]:
            self.spatial *= s
        self.loc = nn.Parameter(torch.zeros(param_shape))
        self.log_scale = nn.Parameter(torch.zeros(param_shape))
        self.min_var = min_var
        self.register_buffer("initialized", torch.tensor(0.0 if data_init else 1.0))
        self._ready = not data_init
        self.register_load_state_dict_post_hook(_refresh_ready)

    def refresh_ready(self) -> None:
        """Re-read ``_ready`` from the ``initialized`` buffer (after a state-dict load or an in-place swap of the
        buffers, e.g. by weight averaging; an averaged flag above 0 counts as initialised)."""
        self._ready = bool(self.initialized)  # host sync: once per load or swap, not per forward

    def mark_initialized(self) -> None:
        """Keep the current parameters as initialised (no data-dependent init will run)."""
        self.initialized.fill_(1.0)
        self._ready = True

    @torch.no_grad()
    def _init(self, x: Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        stats = torch.stack([x.mean(dims), x.pow(2).mean(dims)])
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            world = dist.get_world_size()
            stats /= world
        mean, sq = stats
        self.loc.copy_((-mean).view_as(self.loc))
        n = x.shape[0] * self.spatial * world
        if n >= MIN_INIT_VALUES:
            var = (sq - mean.pow(2)).clamp_min(self.min_var)
            self.log_scale.copy_((-0.5 * torch.log(var)).view_as(self.log_scale))
        else:
            _warn_small_init(x.shape[0], n)
        self.mark_initialized()

    def _log_det(self) -> Tensor:
        log_det = self.log_scale.sum()
        return log_det if self.spatial == 1 else log_det * self.spatial  # vectors: no extra mul node

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self._ready:  # a Python flag: no device read in the forward
            self._init(x)
        z = (x + self.loc) * torch.exp(self.log_scale)
        return z, self._log_det().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return z * torch.exp(-self.log_scale) - self.loc

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(z), (-self._log_det()).expand(z.shape[0])
