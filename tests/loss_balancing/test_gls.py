"""GLS: Σ ℓ̃ has exactly the gradient of the geometric mean (Π L)^{1/K}."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from tests.reference import set_up

positive = st.floats(min_value=1e-3, max_value=1e3)


def _method(k: int) -> tb.GLS:
    return set_up(tb.GLS(), k)


def test_hand_computed_values() -> None:
    out = _method(2)(torch.tensor([1.0, 4.0]))
    # GLS = 2, ℓ̃ = (2 / 2) log L, weights = GLS / (K L)
    torch.testing.assert_close(out.losses, torch.tensor([0.0, math.log(4.0)]))
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 0.25]))


@given(st.lists(st.tuples(positive, positive), min_size=1, max_size=6))
def test_gradient_equals_geometric_mean_gradient(pairs: list[tuple[float, float]]) -> None:
    """(Task permutation: tests/test_contract.py.)"""
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    c = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    k = len(pairs)
    method = _method(k)
    theta = torch.linspace(-1.0, 2.0, k, dtype=torch.float64)

    def grads(scale: torch.Tensor, order: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = theta.clone().requires_grad_()
        losses = (scale * (1 + a * t**2))[order]
        out = method(losses)
        (ours,) = torch.autograd.grad(out.losses.sum(), t)
        t2 = theta.clone().requires_grad_()
        (direct,) = torch.autograd.grad(torch.prod((scale * (1 + a * t2**2))[order]) ** (1.0 / k), t2)
        return ours, direct, out.weights

    identity = list(range(k))
    ours, direct, _ = grads(c, identity)
    torch.testing.assert_close(ours, direct)
    # the direction does not depend on loss scales; the magnitude scales with the geometric mean of c
    unscaled, _, _ = grads(torch.ones_like(c), identity)
    torch.testing.assert_close(ours, unscaled * torch.exp(torch.log(c).mean()))


def test_many_tasks_do_not_overflow() -> None:
    losses = torch.full((200,), 1e3)  # Π L = 1e600 overflows float32 (and float64)
    out = _method(200)(losses)
    assert bool(torch.isfinite(out.losses).all())
    torch.testing.assert_close(out.weights, torch.full((200,), 1 / 200))
