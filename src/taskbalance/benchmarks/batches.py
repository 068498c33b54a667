"""The one batcher every benchmark's loader is: mini-batches of a split whose order depends only on a generator.

A pass draws its order from ``generator`` when iteration starts (a permutation when shuffled, nothing otherwise),
so the generator's state after the first batch, and every batch, depend only on its state before the pass: a run
resumed from a checkpoint of that state sees the same batches. Subclasses say how a batch is assembled from the
positions it holds; :class:`TensorBatches` indexes in-memory tensors.

Data parallelism: :meth:`Batches.shards` gives one rank of a process group its contiguous share of every batch of
the pass all ranks draw alike, so the global batch, and every sample's per-pass draws (augmentation), are those of
one process iterating the batches; a rank assembles its own share only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

BatchT = TypeVar("BatchT")
#: the positions of one batch: a tensor of positions, or a slice of them for in-order passes
Positions = Tensor | slice


class Batches(ABC, Generic[BatchT]):
    """Mini-batches of the samples at positions 0 … ``size`` − 1, in a fresh order each pass when shuffled."""

    def __init__(self, size: int, batch_size: int, shuffle: bool, generator: torch.Generator) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size, self.batch_size, self.shuffle, self.generator = size, batch_size, shuffle, generator

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def order(self) -> Tensor | None:
        """This pass's order of the positions, drawn from the generator when shuffled; None for 0 … size − 1."""
        return torch.randperm(self.size, generator=self.generator) if self.shuffle else None

    def chunks(self, order: Tensor | None) -> Iterator[Positions]:
        """Consecutive batches of ``batch_size`` positions of ``order`` (slices of 0 … size − 1 when None, so that
        in-order batches of tensors are views, not copies); the last batch may be shorter."""
        for start in range(0, self.size, self.batch_size):
            end = start + self.batch_size
            yield slice(start, end) if order is None else order[start:end]

    def start_pass(self) -> None:
        """Draw what else a pass needs from the generator, right after its order (default: nothing)."""

    def __iter__(self) -> Iterator[BatchT]:
        order = self.order()
        self.start_pass()
        for positions in self.chunks(order):
            yield self.batch(positions)

    @abstractmethod
    def batch(self, positions: Positions) -> BatchT:
        """The batch of the samples at ``positions``."""

    def batch_sizes(self) -> list[int]:
        """The number of samples of each batch of a pass."""
        return [min(self.batch_size, self.size - start) for start in range(0, self.size, self.batch_size)]

    def shards(self, rank: int, world: int) -> Iterator[Shard[BatchT]]:
        """Rank ``rank`` of ``world``'s share of every batch of a pass (see :func:`shard_bounds`).

        Every rank must iterate with a generator in the same state: each then draws the same order and per-pass
        draws, and takes its own contiguous slice of each batch's positions.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
        order = self.order()
        self.start_pass()
        for positions in self.chunks(order):
            n = positions.stop - positions.start if isinstance(positions, slice) else int(positions.shape[0])
            if n < world:
                raise ValueError(f"a batch of {n} samples cannot be split over {world} processes")
            start, end = shard_bounds(n, rank, world)
            if isinstance(positions, slice):
                mine: Positions = slice(positions.start + start, positions.start + end)
            else:
                mine = positions[start:end]
            yield Shard(self.batch(mine), end - start, n)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s slice [start, end) of a batch of ``n`` samples split over ``world`` ranks: contiguous, in
    rank order, sizes differing by at most one (equal when ``world`` divides ``n``)."""
    return rank * n // world, (rank + 1) * n // world


@dataclass(frozen=True)
class Shard(Generic[BatchT]):
    """One rank's share of a batch: ``batch`` holds ``size`` of the ``total`` samples of the global batch."""

    batch: BatchT
    size: int
    total: int

    def weight(self, world: int) -> float:
        """The factor size · world / total that makes the mean over ranks of the shards' mean losses the global
        batch's mean loss: exactly 1.0 for equal shards, so that they are left untouched."""
        return self.size * world / self.total


class TensorBatches(Batches[tuple[Tensor, Tensor]]):
    """Batches ``(inputs[positions], targets[positions])`` of in-memory tensors with one row per sample."""

    def __init__(
        self, inputs: Tensor, targets: Tensor, batch_size: int, shuffle: bool, generator: torch.Generator
    ) -> None:
        super().__init__(int(targets.shape[0]), batch_size, shuffle, generator)
        self.inputs, self.targets = inputs, targets

    def batch(self, positions: Positions) -> tuple[Tensor, Tensor]:
        return self.inputs[positions], self.targets[positions]
