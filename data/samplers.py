"""Samplers: a resumable, seeded training sampler and an exact evaluation sampler.

Training (:class:`ResumableSampler`): each epoch's order is a function of (seed, epoch) only, like
``DistributedSampler`` (global shuffle padded to a multiple of the world size, rank r takes every
world-th index) or, for zip 'part' caching, a shuffle of this rank's fixed shard. ``set_start(n)`` skips
the first n samples of the epoch without loading them (mid-epoch resume). Each item is
``(index, sample_seed)`` with ``sample_seed = f(seed, epoch, index)``, so augmentation is reproducible
whatever the worker count or resume point (see ``data.build.SampleDataset``).

Repeated augmentation (:class:`RepeatedAugSampler`, DeiT's ``RASampler``, used by Visformer's recipe):
the epoch's shuffled order with every index repeated ``repeats`` times in a row, padded to a multiple of
the world size, dealt out with stride world size (copies of an image land on different ranks when the
world size is at least ``repeats``),
and each rank's share truncated to ``floor(len // 256 * 256 / world)`` samples, as DeiT does. Each
copy gets its own sample seed, hence its own augmentation.

Evaluation (:class:`ExactEvalSampler`): rank r takes indices r, r+world, ... in order: every image
exactly once over all ranks, no padding duplicates.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import Sampler

from utils import derive_seed


class ResumableSampler(Sampler):
    """Per-epoch shuffled shard for one rank; yields (dataset index, sample seed)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, rank_shard_only: bool = False) -> None:
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.rank_shard_only = seed, shuffle, rank_shard_only
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's epoch order."""
        self.start = max(0, int(start))

    def epoch_indices(self) -> List[int]:
        """This rank's full order for the current epoch (before ``start``)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n, w = self.num_samples, self.world_size
        if self.rank_shard_only:
            # fixed shard (matches 'part' caching), truncated so that every rank has the same length
            shard = torch.arange(self.rank, n, w)[: n // w]
            order = shard[torch.randperm(len(shard), generator=g)] if self.shuffle else shard
            return order.tolist()
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        total = -(-n // w) * w
        if total > n:   # pad by repeating the head, as DistributedSampler does
            order = torch.cat([order, order.repeat(-(-total // n))[: total - n]])
        return order[self.rank:total:w].tolist()

    def per_rank(self) -> int:
        n, w = self.num_samples, self.world_size
        return n // w if self.rank_shard_only else -(-n // w)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for index in self.epoch_indices()[self.start:]:
            yield index, derive_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start)


class RepeatedAugSampler(ResumableSampler):
    """DeiT's repeated-augmentation order for one rank; yields (dataset index, sample seed), the seed a
    function of (seed, epoch, index, copy). Resumable like :class:`ResumableSampler`."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, repeats: int = 3, round_to: int = 256) -> None:
        super().__init__(num_samples, rank, world_size, seed, shuffle)
        self.repeats, self.round_to = repeats, round_to

    def epoch_items(self) -> List[Tuple[int, int]]:
        """This rank's (index, copy number) pairs for the current epoch (before ``start``)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n, w = self.num_samples, self.world_size
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        items = [(i, c) for i in order for c in range(self.repeats)]
        total = math.ceil(n * self.repeats / w) * w
        items += items[: total - len(items)]
        return items[self.rank:total:w][: self.per_rank()]

    def epoch_indices(self) -> List[int]:
        return [i for i, _ in self.epoch_items()]

    def per_rank(self) -> int:
        return int(math.floor(self.num_samples // self.round_to * self.round_to / self.world_size))

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for index, copy in self.epoch_items()[self.start:]:
            yield index, derive_seed(self.seed, self.epoch, index, copy)


class ExactEvalSampler(Sampler):
    """Indices rank, rank + world, ... (in order): the ranks' shards partition the dataset."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices: Sequence[int] = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
