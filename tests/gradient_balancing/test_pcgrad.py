"""PCGrad: projections against the original gradients, from the Gramian; random orders from its own generator.

The sum convention, degenerate inputs, state (the generator), reset and the Balancer path: tests/test_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing.pcgrad import PCGrad, project_conflicting, random_orders
from tests import reference


def _method(k: int, seed: int = 0) -> PCGrad:
    return reference.set_up(PCGrad(seed=seed), k)


def test_hand_computed_two_tasks() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1' = g1 + ½ g2 = (½, ½), g2' = g2 + g1 = (0, 1): w = (2, 3/2), update (½, 3/2)
    weights = _method(2)(jacobian @ jacobian.T, torch.ones(2)).weights
    assert weights is not None
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5]))
    torch.testing.assert_close(weights @ jacobian, torch.tensor([0.5, 1.5]))


@given(st.integers(0, 2**31), st.integers(1, 10))
def test_two_tasks_no_conflict_remains(seed: int, p: int) -> None:
    jacobian = reference.jacobian(seed, 2, p)
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
    jacobian = reference.jacobian(seed, k, p).abs()  # non-negative entries: no pair conflicts
    weights = _method(k, seed)(jacobian @ jacobian.T, torch.ones(k)).weights
    assert weights is not None
    torch.testing.assert_close(weights, torch.ones(k, dtype=torch.float64))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_task_permutation_equivariance_with_matching_orders(seed: int, k: int, p: int) -> None:
    jacobian = reference.jacobian(seed, k, p)
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


def test_opposite_gradients_cancel() -> None:
    jacobian = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    weights = _method(2)(jacobian @ jacobian.T, torch.ones(2)).weights
    assert weights is not None
    torch.testing.assert_close(weights @ jacobian, torch.zeros(2))


def test_bad_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        PCGrad(seed=1.5)  # type: ignore[arg-type]
