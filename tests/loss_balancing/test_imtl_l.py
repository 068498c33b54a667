"""IMTL-L: ℓ̃ = e^s L − s; at its optimum in s every scaled loss e^s L equals 1."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb

positive = st.floats(min_value=1e-3, max_value=1e3)


def test_hand_computed_values_and_gradient() -> None:
    method = tb.IMTLL(n_tasks=2)
    with torch.no_grad():
        method.log_scale.copy_(torch.tensor([0.0, math.log(2.0)]))
    out = method(torch.tensor([3.0, 0.25]))
    torch.testing.assert_close(out.losses, torch.tensor([3.0, 0.5 - math.log(2.0)]))
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 2.0]))
    out.losses.sum().backward()
    assert method.log_scale.grad is not None
    torch.testing.assert_close(method.log_scale.grad, torch.tensor([2.0, -0.5]))  # e^s L − 1


@given(st.lists(positive, min_size=1, max_size=6))
def test_optimum_equalises_scaled_losses(values: list[float]) -> None:
    """At s* = −log L the gradient in s vanishes, every e^s L is 1 (any loss scale), and s* is the minimum."""
    losses = torch.tensor(values, dtype=torch.float64)
    method = tb.IMTLL(n_tasks=len(values)).double()
    with torch.no_grad():
        method.log_scale.copy_(-torch.log(losses))
    out = method(losses)
    out.losses.sum().backward()
    assert method.log_scale.grad is not None
    torch.testing.assert_close(method.log_scale.grad, torch.zeros_like(losses), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.weights * losses, torch.ones_like(losses))
    for delta in (-0.1, 0.1):
        with torch.no_grad():
            method.log_scale.add_(delta)
            assert bool((method(losses).losses >= out.losses).all())
            method.log_scale.sub_(delta)


def test_reset_in_place_and_options() -> None:
    balancer = tb.make("imtl_l", n_tasks=2, init=0.5)
    (param,) = balancer.parameters()
    torch.testing.assert_close(param.detach(), torch.full((2,), 0.5))
    with torch.no_grad():
        param.add_(1.0)
    balancer.reset()
    assert next(iter(balancer.parameters())) is param
    torch.testing.assert_close(param.detach(), torch.full((2,), 0.5))
    assert not balancer.loss.takes_log
    with pytest.raises(ValueError, match="finite"):
        tb.IMTLL(init=float("inf"))
    with pytest.raises(ValueError, match=r"balancer.to\(device\)"):
        tb.IMTLL(n_tasks=2)(torch.ones(2, device="meta"))
