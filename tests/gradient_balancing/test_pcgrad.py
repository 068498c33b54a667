"""PCGrad: projections against the original gradients, from the Gramian; random orders from its own generator."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.pcgrad import PCGrad, project_conflicting, random_orders
from tests.models import DEGENERATE_JACOBIANS, TinyMTL, make_data, task_losses


def _method(k: int, seed: int = 0) -> PCGrad:
    method = PCGrad(seed=seed)
    method.setup(k)
    return method


def _jacobian(seed: int, k: int, p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_hand_computed_two_tasks() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1' = g1 + ½ g2 = (½, ½), g2' = g2 + g1 = (0, 1): w = (2, 3/2), update (½, 3/2)
    weights = _method(2)(jacobian @ jacobian.T, torch.ones(2)).weights
    assert weights is not None
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5]))
    torch.testing.assert_close(weights @ jacobian, torch.tensor([0.5, 1.5]))


@given(st.integers(0, 2**31), st.integers(1, 10))
def test_two_tasks_no_conflict_remains(seed: int, p: int) -> None:
    jacobian = _jacobian(seed, 2, p)
    gram = jacobian @ jacobian.T
    projected = project_conflicting(gram, random_orders(2, torch.Generator())) @ jacobian
    scale = gram.diagonal().max()
    for i, j in ((0, 1), (1, 0)):
        dot = projected[i] @ jacobian[j]
        assert dot >= -1e-9 * scale
        if gram[i, j] < 0:  # a conflicting pair is projected exactly onto the normal plane
            assert abs(dot) <= 1e-9 * scale
        else:
            torch.testing.assert_close(projected[i], jacobian[i])


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_without_conflict_the_update_is_the_sum(seed: int, k: int, p: int) -> None:
    jacobian = _jacobian(seed, k, p).abs()  # non-negative entries: no pair conflicts
    weights = _method(k, seed)(jacobian @ jacobian.T, torch.ones(k)).weights
    assert weights is not None
    torch.testing.assert_close(weights, torch.ones(k, dtype=torch.float64))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_task_permutation_equivariance_with_matching_orders(seed: int, k: int, p: int) -> None:
    jacobian = _jacobian(seed, k, p)
    orders = random_orders(k, torch.Generator().manual_seed(seed))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 1))
    inverse = perm.argsort()
    permuted_orders = inverse[orders[perm]]  # row a visits the tasks that row perm[a] visited, renamed
    coeffs = project_conflicting(jacobian @ jacobian.T, orders)
    permuted = project_conflicting(jacobian[perm] @ jacobian[perm].T, permuted_orders)
    torch.testing.assert_close(permuted, coeffs[perm][:, perm])


def test_random_orders_visit_every_other_task_once() -> None:
    orders = random_orders(7, torch.Generator().manual_seed(3))
    assert orders.shape == (7, 6)
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(7) if j != i]
    assert random_orders(1, torch.Generator()).shape == (1, 0)


def test_sum_convention_for_equal_gradients() -> None:
    g = torch.randn(6, generator=torch.Generator().manual_seed(0))
    jacobian = g.expand(4, 6)
    weights = _method(4)(jacobian @ jacobian.T, torch.ones(4)).weights
    assert weights is not None
    torch.testing.assert_close(weights @ jacobian, 4 * g)


@pytest.mark.parametrize("jacobian", list(DEGENERATE_JACOBIANS.values()), ids=list(DEGENERATE_JACOBIANS))
def test_degenerate_inputs_give_finite_updates(jacobian: torch.Tensor) -> None:
    k = jacobian.shape[0]
    weights = _method(k)(jacobian @ jacobian.T, torch.ones(k, dtype=jacobian.dtype)).weights
    assert weights is not None and weights.dtype == jacobian.dtype
    assert torch.isfinite(weights).all() and torch.isfinite(weights @ jacobian).all()


def test_opposite_gradients_cancel() -> None:
    jacobian = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    weights = _method(2)(jacobian @ jacobian.T, torch.ones(2)).weights
    assert weights is not None
    torch.testing.assert_close(weights @ jacobian, torch.zeros(2))


def test_state_round_trip_and_reset() -> None:
    jacobian = _jacobian(5, 5, 9)
    gram = jacobian @ jacobian.T
    method = _method(5, seed=11)
    first = [method(gram, torch.ones(5)).weights for _ in range(3)]
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh = _method(5, seed=99)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.seed == 11
    for _ in range(3):
        a, b = method(gram, torch.ones(5)).weights, fresh(gram, torch.ones(5)).weights
        assert a is not None and b is not None and torch.equal(a, b)
    method.reset()
    replay = [method(gram, torch.ones(5)).weights for _ in range(3)]
    for a, b in zip(first, replay, strict=True):
        assert a is not None and b is not None and torch.equal(a, b)


def _flat_grad(output: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(output, params, retain_graph=True)])


def test_end_to_end_through_the_balancer() -> None:
    model, (x, y) = TinyMTL(), make_data()
    _, losses = task_losses(model, x, y)
    shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    jacobian = torch.stack([_flat_grad(losses[k], shared) for k in range(3)])
    head_grad = _flat_grad(losses.sum(), heads)
    weights = _method(3, seed=4)(jacobian @ jacobian.T, losses.detach()).weights
    assert weights is not None
    result = tb.make("pcgrad", n_tasks=3, seed=4).backward(losses, shared)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), weights @ jacobian)  # type: ignore[union-attr]
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in heads]), head_grad)  # type: ignore[union-attr]
    assert result.gradient_weights is not None
    torch.testing.assert_close(result.gradient_weights, weights)


def test_bad_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        PCGrad(seed=1.5)  # type: ignore[arg-type]
