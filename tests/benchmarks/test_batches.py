"""The one batcher: batch sizes, in-order views, shuffled order from the generator alone, per-pass draws after it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from taskbalance.benchmarks.batches import Batches, Positions, TensorBatches


def test_in_order_batches_are_views_of_consecutive_rows() -> None:
    inputs, targets = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    loader = TensorBatches(inputs, targets, 4, shuffle=False, generator=torch.Generator())
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[1][0].data_ptr() == inputs[4].data_ptr()  # a view, not a copy


def test_a_shuffled_pass_draws_one_permutation_from_the_generator() -> None:
    targets = torch.arange(10)
    generator = torch.Generator().manual_seed(3)
    seen = torch.cat([t for _, t in TensorBatches(targets, targets, 3, shuffle=True, generator=generator)])
    assert seen.tolist() == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    again = torch.cat([t for _, t in TensorBatches(targets, targets, 3, shuffle=True, generator=generator)])
    assert sorted(again.tolist()) == list(range(10)) and again.tolist() != seen.tolist()  # the next pass differs


class Drawing(Batches[list[float]]):
    """Draws one number per sample when a pass starts, after the order (as the dense loader's augmentation)."""

    def start_pass(self) -> None:
        self.draws = torch.rand(self.size, generator=self.generator)

    def batch(self, positions: Positions) -> list[float]:
        chosen: Tensor = self.draws[positions]
        return chosen.tolist()


def test_per_pass_draws_follow_the_order() -> None:
    generator = torch.Generator().manual_seed(0)
    drawn = [x for batch in Drawing(5, 2, shuffle=True, generator=generator) for x in batch]
    reference = torch.Generator().manual_seed(0)
    order = torch.randperm(5, generator=reference)
    assert drawn == torch.rand(5, generator=reference)[order].tolist()


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(torch.zeros(2), torch.zeros(2), 0, shuffle=False, generator=torch.Generator())
