"""ConFIG: equal positive cosine with every task gradient, projection length, from the Gramian.

Task permutation, the sum convention, degenerate inputs, state and the Balancer path: tests/test_contract.py.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing.con_fig import ConFIG
from tests import reference


def _update(jacobian: torch.Tensor) -> torch.Tensor:
    weights = reference.weights(reference.set_up(ConFIG(), jacobian.shape[0]), jacobian)
    assert weights.dtype == jacobian.dtype
    return torch.mv(jacobian.T, weights)


def _reference(jacobian: torch.Tensor) -> torch.Tensor:
    """The paper's recipe on J itself: d = pinv(U) 1, then the summed projections as length."""
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    direction = torch.mv(torch.linalg.pinv(units), torch.ones(jacobian.shape[0], dtype=jacobian.dtype))
    if direction.norm() < 1e-10:  # U⁺1 = 0 up to rounding (e.g. opposite gradients): no direction
        return torch.zeros_like(direction)
    unit = direction / direction.norm()
    update: torch.Tensor = torch.mv(jacobian, unit).sum() * unit
    return update


def test_hand_computed() -> None:
    torch.testing.assert_close(_update(torch.eye(2)), torch.ones(2))
    # u1 = (1, 0), u2 = (1, 1)/√2: d = (1, √2 − 1); length rule gives ((3 + 2√2)/2, (1 + √2)/2)
    jacobian = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    r = math.sqrt(2)
    torch.testing.assert_close(_update(jacobian), torch.tensor([(3 + 2 * r) / 2, (1 + r) / 2], dtype=torch.float64))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 10))
def test_matches_the_pseudo_inverse_on_the_jacobian(seed: int, k: int, p: int) -> None:
    jacobian = reference.jacobian(seed, k, p)
    torch.testing.assert_close(_update(jacobian), _reference(jacobian), atol=1e-7, rtol=1e-6)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(0, 6), st.sampled_from([torch.float32, torch.float64]))
def test_equal_positive_cosine_with_every_gradient(seed: int, k: int, extra: int, dtype: torch.dtype) -> None:
    jacobian = reference.jacobian(seed, k, k + extra, dtype=dtype)  # full row rank
    update = _update(jacobian)
    cosines = torch.cosine_similarity(update[None].double(), jacobian.double(), dim=1)
    assert (cosines > 0).all()
    # the Gramian route squares the condition number: accuracy is ε · cond(C) for the cosine matrix C
    units = jacobian.double() / jacobian.double().norm(dim=1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(units @ units.T)
    tolerance = max(1e-9, 50 * torch.finfo(dtype).eps * float(eigenvalues[-1] / eigenvalues[0]))
    torch.testing.assert_close(cosines, cosines.mean().expand(k), atol=tolerance, rtol=tolerance)
    # the length is the sum of the projections of the gradients on the direction
    unit = update.double() / update.double().norm()
    torch.testing.assert_close(update.double().norm(), (jacobian.double() @ unit).sum(), atol=0, rtol=tolerance)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(0, 4))
def test_direction_invariant_to_task_scales(seed: int, k: int, extra: int) -> None:
    # full row rank: with K > P the summed projections can be negative and flip the direction with the scales
    jacobian = reference.jacobian(seed, k, k + extra)
    generator = torch.Generator().manual_seed(seed)
    torch.randperm(k, generator=generator)  # the permutation's draw (its check: tests/test_contract.py)
    scales = torch.rand(k, 1, generator=generator, dtype=torch.float64) * 100 + 0.01
    update = _update(jacobian)
    scaled = _update(scales * jacobian)
    torch.testing.assert_close(scaled * update.norm(), update * scaled.norm())  # same direction (or both zero)


def test_parallel_gradients_give_their_sum() -> None:
    g = torch.randn(6, generator=torch.Generator().manual_seed(0))
    parallel = torch.tensor([[1.0], [2.0], [0.5]]) * g
    torch.testing.assert_close(_update(parallel), 3.5 * g)


def test_opposite_gradients_give_zero_and_zero_gradients_zero_weight() -> None:
    torch.testing.assert_close(_update(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])), torch.zeros(2))
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    weights = reference.weights(reference.set_up(ConFIG(), 3), jacobian)
    assert weights[1] == 0
    torch.testing.assert_close(weights @ jacobian, _reference(jacobian[[0, 2]]))


def test_one_much_longer_gradient_keeps_equal_cosines() -> None:
    jacobian = torch.tensor([[1e6, 2e6, 0.0], [-1.0, 0.5, 1.0]])
    cosines = torch.cosine_similarity(_update(jacobian)[None], jacobian, dim=1)
    torch.testing.assert_close(cosines[0], cosines[1], atol=1e-4, rtol=1e-4)
