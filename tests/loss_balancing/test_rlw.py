"""RLW: w = K · softmax(u), u ~ N(0, I) from the method's own seeded generator."""

from __future__ import annotations

import torch

import taskbalance as tb


def test_weights_are_k_softmax_of_the_seeded_normal_draws() -> None:
    method = tb.RLW(seed=7)
    method.setup(4)
    reference = torch.Generator().manual_seed(7)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for _ in range(3):
        expected = 4 * torch.softmax(torch.randn(4, generator=reference, dtype=torch.float64), dim=0)
        out = method(losses)
        torch.testing.assert_close(out.weights, expected.float())
        torch.testing.assert_close(out.losses, out.weights * losses)


def test_weights_positive_sum_to_k_and_average_one() -> None:
    method = tb.RLW(seed=0)
    method.setup(3)
    draws = torch.stack([method(torch.ones(3, dtype=torch.float64)).weights for _ in range(4000)])
    assert bool((draws > 0).all())
    torch.testing.assert_close(draws.sum(dim=1), torch.full((4000,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(draws.mean(dim=0), torch.ones(3, dtype=torch.float64), atol=0.03, rtol=0)
    assert bool((draws.std(dim=0) > 0.3).all())


def test_seed_reset_and_log_variant() -> None:
    first, second = tb.RLW(seed=3), tb.RLW(seed=4)
    first.setup(3)
    second.setup(3)
    losses = torch.tensor([0.5, 2.0, 4.0])
    sequence = [first(losses).weights for _ in range(3)]
    assert not torch.equal(sequence[0], second(losses).weights)
    first.reset()
    for weights in sequence:
        torch.testing.assert_close(first(losses).weights, weights)
    unseeded = tb.RLW()
    unseeded.setup(3)
    drawn = [unseeded(losses).weights for _ in range(2)]
    unseeded.reset()
    torch.testing.assert_close(torch.stack([unseeded(losses).weights for _ in range(2)]), torch.stack(drawn))
    logged = tb.RLW(seed=3, log_losses=True)
    logged.setup(3)
    assert logged.takes_log and not first.takes_log
    torch.testing.assert_close(logged(losses).losses, sequence[0] * torch.log(losses))
