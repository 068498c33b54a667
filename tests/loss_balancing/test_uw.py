"""UW: ℓ̃ = f / (2e^s) + s / 2 with learnable s; at its optimum in s, e^s = f."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb

positive = st.floats(min_value=1e-3, max_value=1e3)


def test_hand_computed_values_and_gradient() -> None:
    method = tb.UW(n_tasks=2)
    losses = torch.tensor([2.0, 4.0])
    out = method(losses)
    torch.testing.assert_close(out.losses, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(out.weights, torch.tensor([0.5, 0.5]))
    out.losses.sum().backward()
    assert method.log_var.grad is not None
    torch.testing.assert_close(method.log_var.grad, torch.tensor([-0.5, -1.5]))  # −L/(2e^s) + 1/2


def test_libmtl_init_and_log_variant() -> None:
    method = tb.UW(init=-0.5, log_losses=True, n_tasks=2)
    assert method.takes_log
    losses = torch.tensor([1.0, math.e])
    precision = 0.5 * math.exp(0.5)
    torch.testing.assert_close(method(losses).losses, torch.tensor([-0.25, precision - 0.25]))
    torch.testing.assert_close(method(losses).weights, torch.full((2,), precision))
    assert tb.make("uw_si", n_tasks=2).loss.takes_log
    assert not tb.make("uw", n_tasks=2).loss.takes_log


@given(st.lists(positive, min_size=1, max_size=6), st.booleans())
def test_optimum_in_s_is_log_of_the_loss(values: list[float], use_log: bool) -> None:
    """∂ℓ̃/∂s = 0 at s* = log f, and s* is the minimum (ℓ̃ is convex in s)."""
    losses = torch.tensor(values, dtype=torch.float64)
    if use_log:
        losses = losses + 1.0  # log L > 0 so that s* = log log L exists
    method = tb.UW(log_losses=use_log, n_tasks=len(values)).double()
    f = torch.log(losses) if use_log else losses
    with torch.no_grad():
        method.log_var.copy_(torch.log(f))
    at_optimum = method(losses).losses
    at_optimum.sum().backward()
    assert method.log_var.grad is not None
    torch.testing.assert_close(method.log_var.grad, torch.zeros_like(f), atol=1e-12, rtol=0)
    for delta in (-0.1, 0.1):
        with torch.no_grad():
            method.log_var.add_(delta)
            assert bool((method(losses).losses >= at_optimum).all())
            method.log_var.sub_(delta)


def test_parameters_reset_in_place() -> None:
    balancer = tb.make("uw", n_tasks=3)
    params = list(balancer.parameters())
    assert len(params) == 1 and params[0].shape == (3,)
    optimizer = torch.optim.SGD(params, lr=0.5)
    balancer.loss(torch.tensor([3.0, 1.0, 0.1])).losses.sum().backward()
    optimizer.step()
    assert not torch.equal(params[0], torch.zeros(3))
    balancer.reset()
    assert next(iter(balancer.parameters())) is params[0]
    torch.testing.assert_close(params[0].detach(), torch.zeros(3))


def test_bad_options_and_device_mismatch() -> None:
    with pytest.raises(ValueError, match="finite"):
        tb.UW(init=float("nan"))
    method = tb.UW(n_tasks=2)
    with pytest.raises(ValueError, match=r"balancer.to\(device\)"):
        method(torch.ones(2, device="meta"))
