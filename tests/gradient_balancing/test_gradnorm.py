"""GradNorm: task weights learnt by Adam on Σ|w_k‖g_k‖ − Ḡ r_k^α|, renormalised to sum K.

Task permutation, the sum convention, state, reset and the Balancer path: tests/test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.gradnorm import GradNorm
from tests import reference
from tests.models import DEGENERATE_JACOBIANS, TinyMTL, make_data, task_losses


def _method(k: int, **options: float) -> GradNorm:
    return reference.set_up(GradNorm(**options), k)


def _step(method: GradNorm, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    weights: torch.Tensor | None = method(gram, losses).weights
    assert weights is not None and weights.dtype == gram.dtype
    return weights


def test_hand_computed_two_steps() -> None:
    method = _method(2, alpha=1.5, lr=0.025)
    gram = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))  # ‖g‖ = (2, 1)
    # step 1: w = 1, Ḡ = 1.5, r = 1: ∂L/∂w = (+2, −1); Adam's first step is lr · sign
    torch.testing.assert_close(_step(method, gram, torch.tensor([1.0, 1.0])), torch.ones(2, dtype=torch.float64))
    w = [1 - 0.025, 1 + 0.025]
    torch.testing.assert_close(method.weights, torch.tensor(w, dtype=torch.float64))
    # step 2: losses (0.5, 1): ratios (0.5, 1), r = (2/3, 4/3); G_k = w_k ‖g_k‖
    weighted = [w[0] * 2, w[1] * 1]
    mean = sum(weighted) / 2
    grads = [
        math.copysign(2.0, weighted[0] - mean * (2 / 3) ** 1.5),
        math.copysign(1.0, weighted[1] - mean * (4 / 3) ** 1.5),
    ]
    expected = []
    for wk, first, second in zip(w, (2.0, -1.0), grads, strict=True):
        m = 0.9 * (0.1 * first) + 0.1 * second
        v = 0.999 * (0.001 * first**2) + 0.001 * second**2
        expected.append(wk - 0.025 / (1 - 0.9**2) * m / (math.sqrt(v) / math.sqrt(1 - 0.999**2) + 1e-8))
    expected_t = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(_step(method, gram, torch.tensor([0.5, 1.0])), torch.tensor(w, dtype=torch.float64))
    torch.testing.assert_close(method.weights, 2 * expected_t / expected_t.sum())


@given(st.integers(0, 2**31), st.integers(2, 6), st.integers(1, 8), st.floats(0.0, 3.0))
def test_weights_move_against_the_mismatch(seed: int, k: int, p: int, alpha: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(k, p, generator=generator, dtype=torch.float64)
    gram = jacobian @ jacobian.T
    first = torch.rand(k, generator=generator, dtype=torch.float64) + 0.1
    second = first * (torch.rand(k, generator=generator, dtype=torch.float64) + 0.1)
    method = _method(k, alpha=alpha)
    _step(method, gram, first)
    before = method.weights.clone()
    _step(method, gram, second)
    norms = gram.diagonal().sqrt()
    weighted = before * norms
    ratios = second / first
    mismatch = weighted - weighted.mean() * (ratios / ratios.mean()) ** alpha
    after = method.weights
    torch.testing.assert_close(after.sum(), torch.tensor(float(k), dtype=torch.float64))
    assert (after >= 0).all()
    # relative to each other, too-long tasks lose weight and too-short ones gain (renormalisation is common)
    change = after / before
    too_long, too_short = change[mismatch > 1e-9], change[mismatch < -1e-9]
    if len(too_long) and len(too_short):
        assert too_long.max() < too_short.min()


def test_weighted_norms_are_equalised_with_alpha_zero() -> None:
    gram = torch.diag(torch.tensor([1.0, 16.0, 4.0]))  # ‖g‖ = (1, 4, 2)
    method = _method(3, alpha=0.0)
    for _ in range(400):
        _step(method, gram, torch.ones(3))
    weighted = method.weights * torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(weighted, weighted.mean().expand(3), atol=0.05, rtol=0)


def test_first_losses_must_be_positive_later_ones_count_as_trained() -> None:
    method = _method(2)
    with pytest.raises(ValueError, match="positive losses"):
        method(torch.eye(2), torch.tensor([1.0, 0.0]))
    method(torch.eye(2), torch.tensor([1.0, 2.0]))
    weights = method(torch.eye(2), torch.tensor([-1.0, 0.0])).weights
    assert weights is not None and torch.isfinite(weights).all() and torch.isfinite(method.weights).all()


@pytest.mark.parametrize("jacobian", list(DEGENERATE_JACOBIANS.values()), ids=list(DEGENERATE_JACOBIANS))
def test_degenerate_inputs_give_finite_updates(jacobian: torch.Tensor) -> None:
    k = jacobian.shape[0]
    method = _method(k)
    for step in range(5):
        weights = _step(method, jacobian @ jacobian.T, torch.full((k,), 1.0 / (step + 1), dtype=jacobian.dtype))
        assert torch.isfinite(weights @ jacobian).all() and (weights >= 0).all()
        torch.testing.assert_close(method.weights.sum(), torch.tensor(float(k), dtype=torch.float64))


def test_weights_are_learnt_but_are_not_parameters() -> None:
    model, (x, y) = TinyMTL(), make_data()
    balancer = tb.make("gradnorm", n_tasks=3, lr=0.1)
    for _ in range(3):  # the weights change after the first step (the update itself: tests/test_contract.py)
        _, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters())
    gradnorm = balancer.gradient
    assert isinstance(gradnorm, GradNorm)
    assert not torch.equal(gradnorm.weights, torch.ones(3, dtype=torch.float64))
    assert list(balancer.parameters()) == []  # the weights are not stepped by the model's optimiser


@pytest.mark.parametrize(("options", "message"), [({"alpha": -1.0}, "alpha"), ({"lr": 0.0}, "lr")])
def test_bad_options_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradNorm(**options)
