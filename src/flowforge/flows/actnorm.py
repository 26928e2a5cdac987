"""Activation normalisation (Kingma & Dhariwal, Glow, 2018).

``z = (x + b) * exp(s)`` per channel, ``log |det| = (H W) sum_c s_c``.  With ``data_init`` the first
batch sets ``b = -mean`` and ``s = -1/2 log(max(var, min_var))`` so the output has zero mean and unit
variance per channel.  Under ``torch.distributed`` the statistics are averaged over all ranks, so every
rank starts from the same parameters.  Whether the init happened is kept in the ``initialized`` buffer
(saved in checkpoints; a float so that weight averaging can copy it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowforge.flows.base import Transform


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

    @torch.no_grad()
    def _init(self, x: Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        stats = torch.stack([x.mean(dims), x.pow(2).mean(dims)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        mean, sq = stats
        var = (sq - mean.pow(2)).clamp_min(self.min_var)
        self.loc.copy_((-mean).view_as(self.loc))
        self.log_scale.copy_((-0.5 * torch.log(var)).view_as(self.log_scale))
        self.initialized.fill_(1.0)

    def _log_det(self) -> Tensor:
        log_det = self.log_scale.sum()
        return log_det if self.spatial == 1 else log_det * self.spatial  # vectors: no extra mul node

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # (keep reading the buffer each call: callbacks such as EMA swap buffers in place, so a Python-side
        # "initialized" cache would go stale)
        if not self.initialized:
            self._init(x)
        z = (x + self.loc) * torch.exp(self.log_scale)
        return z, self._log_det().expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z * torch.exp(-self.log_scale) - self.loc

    def inverse_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(z), (-self._log_det()).expand(z.shape[0])
