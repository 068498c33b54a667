"""SI: ℓ̃ = log L; its gradient ignores per-task loss scales."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from tests.models import TinyMTL, make_data, task_losses

positive = st.floats(min_value=1e-3, max_value=1e3)


def test_hand_computed_values() -> None:
    method = tb.ScaleInvariant()
    method.setup(3)
    out = method(torch.tensor([1.0, math.e, 0.5]))
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 1.0, math.log(0.5)]))
    torch.testing.assert_close(out.weights, torch.ones(3))


def test_eps_reproduces_dbmtl_shift() -> None:
    method = tb.ScaleInvariant(eps=1e-8)
    method.setup(2)
    losses = torch.tensor([1e-8, 2.0], dtype=torch.float64)
    torch.testing.assert_close(method(losses).losses, torch.log(losses + 1e-8))
    with pytest.raises(ValueError, match=">= 0"):
        tb.ScaleInvariant(eps=-1.0)


@given(st.lists(st.tuples(positive, positive), min_size=1, max_size=6))
def test_gradient_invariant_to_loss_scaling(pairs: list[tuple[float, float]]) -> None:
    """L_k(θ) = c_k · (1 + a_k θ_k²): the SI gradient in θ does not depend on c (permutation: test_contract)."""
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    c = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    theta = torch.linspace(-1.0, 1.0, len(pairs), dtype=torch.float64)
    method = tb.ScaleInvariant()
    method.setup(len(pairs))

    def grad(scale: torch.Tensor, order: list[int]) -> torch.Tensor:
        t = theta.clone().requires_grad_()
        losses = (scale * (1 + a * t**2))[order]
        (g,) = torch.autograd.grad(method(losses).losses.sum(), t)
        return g

    identity = list(range(len(pairs)))
    expected = 2 * a * theta / (1 + a * theta**2)
    torch.testing.assert_close(grad(c, identity), expected)
    torch.testing.assert_close(grad(torch.ones_like(c), identity), expected)


def test_balancer_refuses_non_positive_loss() -> None:
    model = TinyMTL()
    x, y = make_data()
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] have loss <= 0"):
        tb.make("si", n_tasks=3).backward(losses * torch.tensor([1.0, 0.0, 1.0]), model.encoder.parameters())
