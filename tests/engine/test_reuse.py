"""Amortised gradient methods (``Balancer(update_weights_every=N)``): solve on every N-th call, reuse w between."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import taskbalance as tb
from taskbalance.gradient_balancing.base import Combination, GradientBalancer
from tests.models import TinyMTL, make_data, task_losses


class CountingWeights(GradientBalancer):
    """w = 1 + (number of earlier solves) · (1, 2, …, K)/10: every solve gives new weights, and counts itself."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        self.solves = 0

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        ramp = torch.arange(1, self.n_tasks + 1, dtype=matrix.dtype, device=matrix.device)
        weights = 1 + self.solves * ramp / 10
        self.solves += 1
        return Combination(weights=weights)


def _grads(model: TinyMTL) -> list[Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _reference(model: TinyMTL, x: Tensor, y: Tensor, weights: Tensor, max_norm: float | None = None) -> list[Tensor]:
    """θ.grad = clip(Σ_k w_k ∇ℓ_k), heads' grad = ∇ Σ_k ℓ_k, computed by hand."""
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    encoder = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    update = torch.autograd.grad(losses @ weights, encoder, retain_graph=True)
    if max_norm is not None:
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in update]))
        update = tuple(g * min(1.0, max_norm / float(norm)) for g in update)
    head_grads = torch.autograd.grad(losses.sum(), heads)
    model.zero_grad(set_to_none=True)
    return [*update, *head_grads]


def _step(model: TinyMTL, balancer: tb.Balancer, x: Tensor, y: Tensor) -> tuple[tb.BalanceResult, list[Tensor]]:
    model.zero_grad(set_to_none=True)
    features, losses = task_losses(model, x, y)
    result = balancer.backward(losses, model.encoder.parameters(), features=features)
    return result, _grads(model)


def test_solves_on_every_nth_call_only() -> None:
    model, (x, y) = TinyMTL(), make_data()
    method = CountingWeights()
    balancer = tb.Balancer(gradient=method, n_tasks=3, update_weights_every=3)
    seen = []
    for _ in range(7):
        result, _ = _step(model, balancer, x, y)
        assert result.gradient_weights is not None
        seen.append(result.gradient_weights[2].item())
    assert method.solves == 3  # calls 0, 3, 6
    assert seen == pytest.approx([1.0, 1.0, 1.0, 1.3, 1.3, 1.3, 1.6])


@pytest.mark.parametrize("engine", ["auto", "loop", "features", "gramian", "representation"])
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_reuse_step_is_the_weighted_gradient(engine: str, max_norm: float | None) -> None:
    # the reuse step does not depend on the path that solved: θ gets clip(Jᵀw), heads ∇ Σ ℓ̃
    model, (x, y) = TinyMTL(), make_data()
    balancer = tb.Balancer(gradient=CountingWeights(max_norm), n_tasks=3, engine=engine, update_weights_every=2)  # type: ignore[arg-type]
    _step(model, balancer, x, y)
    result, grads = _step(model, balancer, x, y)
    expected = _reference(model, x, y, torch.ones(3), max_norm)
    assert balancer._engine.last_path == "reuse"
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(result.weights, torch.ones(3))


@given(st.integers(0, 2**16), st.lists(st.floats(0.0, 5.0), min_size=3, max_size=3))
def test_reused_weights_combine_with_loss_weights(seed: int, fixed: list[float]) -> None:
    # a loss method's weights multiply the reused gradient weights: θ gets Σ_k w_k c_k ∇L_k
    model, (x, y) = TinyMTL(seed=seed % 7), make_data(seed=seed)
    balancer = tb.Balancer(loss=tb.Equal(fixed), gradient=CountingWeights(), n_tasks=3, update_weights_every=4)
    for _ in range(5):  # solves at calls 0 and 4: weights 1 then 1 + ramp/10; the 6th call reuses the second
        _step(model, balancer, x, y)
    result, grads = _step(model, balancer, x, y)
    gradient_weights = 1 + torch.arange(1, 4, dtype=torch.float32) / 10
    effective = torch.tensor(fixed) * gradient_weights
    expected = _reference(model, x, y, effective)
    encoder = len(list(model.encoder.parameters()))
    for got, want in zip(grads[:encoder], expected[:encoder], strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(result.weights, effective)


def test_every_one_is_the_exact_method() -> None:
    model, (x, y) = TinyMTL(), make_data()
    exact, every_one = CountingWeights(), CountingWeights()
    a = tb.Balancer(gradient=exact, n_tasks=3)
    b = tb.Balancer(gradient=every_one, n_tasks=3, update_weights_every=1)
    for _ in range(3):
        _, ga = _step(model, a, x, y)
        _, gb = _step(model, b, x, y)
        for u, v in zip(ga, gb, strict=True):
            assert torch.equal(u, v)
    assert exact.solves == every_one.solves == 3


def test_reset_solves_again() -> None:
    model, (x, y) = TinyMTL(), make_data()
    method = CountingWeights()
    balancer = tb.Balancer(gradient=method, n_tasks=3, update_weights_every=5)
    _step(model, balancer, x, y)
    balancer.reset()
    _step(model, balancer, x, y)
    assert method.solves == 2


def test_refused_for_methods_without_weights_and_bad_values() -> None:
    with pytest.raises(ValueError, match="weight-based"):
        tb.make("dbmtl", n_tasks=2, update_weights_every=2)
    with pytest.raises(ValueError, match=">= 1"):
        tb.make("mgda", n_tasks=2, update_weights_every=0)
    with pytest.raises(TypeError, match="int"):
        tb.make("mgda", n_tasks=2, update_weights_every=2.0)
    assert "update_weights_every=4" in repr(tb.make("nashmtl", n_tasks=2, update_weights_every=4))
