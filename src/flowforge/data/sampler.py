"""The samplers of the data modules: the training order, a pure function of (seed, epoch) and resumable mid-epoch
(:class:`ResumableSampler`), and the evaluation shards of DDP ranks, without repeats (:class:`EvalSampler`).

Epoch ``e`` visits the examples in the order ``randperm(n)`` drawn from a generator seeded with
``seed + e`` (``torch.utils.data.DistributedSampler``'s rule, so under DDP each of the ``R`` ranks takes
every ``R``-th index of the same permutation).  Nothing is drawn from the global random state, so the order
does not depend on what else consumed random numbers before the epoch began, and
:meth:`ResumableSampler.resume_at` can skip exactly the examples a checkpointed run had already used in its
interrupted epoch.

With ``mirrored=True`` the dataset holds each example twice, ``i`` (as stored) and ``i + n`` (its mirror
image, see :class:`flowforge.data.base.Mirrored`), and the sampler picks one of the two for every example
in every epoch with probability 1/2 from a second generator seeded by ``(seed, e)``: random horizontal flips
that are reproducible and survive a restart and multi-process loading.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from flowforge.errors import ConfigError

_MIRROR_STREAM = 0x5F3759DF  # separates the flip draws from the permutation draws


class ResumableSampler(DistributedSampler):
    """Args:
    num_examples: ``n``, the number of distinct examples (half the dataset's length when mirrored).
    num_replicas / rank: DDP world size and this process's rank (1 / 0 without DDP).
    shuffle: permute each epoch (False: ``0, 1, ..., n - 1``).
    seed: the order's seed.
    mirrored: also choose a random side (see module docstring).
    """

    def __init__(
        self,
        num_examples: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        mirrored: bool = False,
    ):
        super().__init__(range(num_examples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_examples = num_examples
        self.mirrored = mirrored
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, num_used: int) -> None:
        """Make the next iteration over epoch ``epoch`` skip its first ``num_used`` indices (of this rank)."""
        self._resume = (int(epoch), int(num_used))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.mirrored:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + _MIRROR_STREAM)
            side = torch.randint(0, 2, (self.num_examples,), generator=g).tolist()
            indices = [i + self.num_examples * side[i] for i in indices]
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            indices = indices[resume[1] :]
        return iter(indices)


class EvalSampler(DistributedSampler):
    """The evaluation order under DDP: the split in stored order is cut into batches of ``batch_size``, and rank
    ``r`` of ``R`` takes batches ``r, r + R, r + 2R, ...``, without padding, so every example is evaluated exactly
    once across the ranks (Lightning's own ``DistributedSampler`` repeats examples to give every rank the same count,
    and a metric averaged over them counts those twice).  Rank ``r``'s ``i``-th batch is batch ``i * R + r`` of the
    split, the same examples one process evaluates as its batch ``i * R + r``: the evaluation's random streams are
    seeded per batch of the split (:class:`flowforge.training.resume.EvaluationSeeds`), so a stochastic evaluation
    (the dequantisation noise of image data, an estimated log-det) draws the same numbers for every example however
    many processes evaluate it.  Ranks hold at most one batch more than each other; evaluation logs nothing per batch
    across ranks, so uneven batch counts are safe.

    Args:
        num_examples: the split's size ``n``; it must be at least ``num_replicas``, so that no rank is left without
            data (DDP syncs buffers on a rank's first evaluation batch).
        num_replicas / rank: DDP world size and this process's rank.
        what: the split's name for the error message.
        batch_size: the evaluation batch size; lowered to ``n // R`` when the split has fewer batches than ranks
            (read it back as ``self.batch_size`` and give the loader that size).
    """

    def __init__(
        self, num_examples: int, num_replicas: int = 1, rank: int = 0, what: str = "the split", batch_size: int = 1
    ):
        if num_examples < num_replicas:
            raise ConfigError(
                f"{what} has {num_examples} example(s), fewer than the {num_replicas} DDP processes, so some process "
                f"would evaluate nothing; use fewer devices (trainer.devices) or a larger split"
            )
        super().__init__(range(num_examples), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size = max(1, min(batch_size, num_examples // num_replicas))
        self.total_size = num_examples
        self.num_samples = len(self._indices())

    def _indices(self) -> list[int]:
        n, bs = self.total_size, self.batch_size
        return [i for b in range(self.rank * bs, n, self.num_replicas * bs) for i in range(b, min(b + bs, n))]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())
