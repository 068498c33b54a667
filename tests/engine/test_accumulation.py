"""The pieces of exact accumulation and loss scaling, by hand-computed values."""

from __future__ import annotations

import torch

from taskbalance.engine.accumulation import MicroBatches, chained, loss_jacobian
from taskbalance.engine.context import StepContext


def test_the_chain_rule_factor_applies_to_the_shared_blocks_and_its_column_sums_to_the_heads() -> None:
    chain = torch.tensor([[1.0, 2.0], [0.0, 3.0]])  # D = ∂ℓ̃/∂L
    shared = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])  # J_L of a 3-parameter shared tensor
    head = torch.tensor([[[1.0]], [[4.0]]])  # J_L of a (1, 1) head parameter
    blocks, heads = chained(chain, [shared, head], n_shared=1, scale=2.0)
    assert torch.equal(blocks[0], 2.0 * torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, 3.0]]))
    assert torch.equal(heads[0], 2.0 * torch.tensor([[1.0 * 1 + 5.0 * 4]]))  # 1ᵀD = (1, 5)


def test_the_loss_jacobian_is_the_chain_rule_factor_of_a_loss_method() -> None:
    losses = torch.tensor([2.0, 4.0], requires_grad=True)
    balanced = torch.stack([3.0 * losses[0].log(), losses[0] * losses[1]])
    assert torch.allclose(loss_jacobian(balanced, losses), torch.tensor([[1.5, 0.0], [4.0, 2.0]]))


def test_micro_batches_average_losses_and_blocks_and_record_nothing_on_the_last() -> None:
    micro = MicroBatches()
    params = [torch.zeros(2, requires_grad=True)]
    micro.record(torch.tensor([1.0, 3.0]), [torch.ones(2, 2)], params, finite=True)
    mean, totals, represented = micro.totals(torch.tensor([3.0, 5.0]), [3 * torch.ones(2, 2)])
    assert torch.equal(mean, torch.tensor([2.0, 4.0])) and torch.equal(totals[0], 2 * torch.ones(2, 2))
    assert represented is None and micro.count == 1 and micro.pending
    micro.clear()
    assert not micro.pending and micro.finite


def test_a_step_context_unscales_what_the_method_reads_and_scales_what_it_returns() -> None:
    context = StepContext(scale=8.0)
    assert torch.equal(context.unscaled(torch.tensor([64.0]), 2), torch.tensor([1.0]))
    assert torch.equal(context.scaled(torch.tensor([0.5])), torch.tensor([4.0]))
    assert context.max_norm(2.0) == 16.0 and context.max_norm(None) is None
    plain = StepContext()
    same = torch.tensor([3.0])
    assert plain.unscaled(same) is same and plain.scaled(same) is same and plain.max_norm(2.0) == 2.0
    assert plain.agree(False) is False and plain.exact_ranks is None and plain.local_ranks is None
