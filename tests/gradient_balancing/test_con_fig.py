"""ConFIG: equal positive cosine with every task gradient, projection length, from the Gramian."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.con_fig import ConFIG
from tests.models import DEGENERATE_JACOBIANS, TinyMTL, make_data, task_losses


def _update(jacobian: torch.Tensor) -> torch.Tensor:
    method = ConFIG()
    method.setup(jacobian.shape[0])
    weights: torch.Tensor | None = method(
        jacobian @ jacobian.T, torch.ones(jacobian.shape[0], dtype=jacobian.dtype)
    ).weights
    assert weights is not None and weights.dtype == jacobian.dtype
    return torch.mv(jacobian.T, weights)


def _jacobian(seed: int, k: int, p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


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
    jacobian = _jacobian(seed, k, p)
    torch.testing.assert_close(_update(jacobian), _reference(jacobian), atol=1e-7, rtol=1e-6)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(0, 6), st.sampled_from([torch.float32, torch.float64]))
def test_equal_positive_cosine_with_every_gradient(seed: int, k: int, extra: int, dtype: torch.dtype) -> None:
    jacobian = _jacobian(seed, k, k + extra, dtype)  # full row rank
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
def test_permutation_equivariance_and_direction_invariant_to_task_scales(seed: int, k: int, extra: int) -> None:
    # full row rank: with K > P the summed projections can be negative and flip the direction with the scales
    jacobian = _jacobian(seed, k, k + extra)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=generator)
    scales = torch.rand(k, 1, generator=generator, dtype=torch.float64) * 100 + 0.01
    update = _update(jacobian)
    torch.testing.assert_close(_update(jacobian[perm]), update)
    scaled = _update(scales * jacobian)
    torch.testing.assert_close(scaled * update.norm(), update * scaled.norm())  # same direction (or both zero)


def test_sum_convention_for_equal_and_parallel_gradients() -> None:
    g = torch.randn(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_update(g.expand(4, 6)), 4 * g)
    parallel = torch.tensor([[1.0], [2.0], [0.5]]) * g
    torch.testing.assert_close(_update(parallel), 3.5 * g)


def test_opposite_gradients_give_zero_and_zero_gradients_zero_weight() -> None:
    torch.testing.assert_close(_update(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])), torch.zeros(2))
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    method = ConFIG()
    method.setup(3)
    weights = method(jacobian @ jacobian.T, torch.ones(3)).weights
    assert weights is not None
    assert weights[1] == 0
    torch.testing.assert_close(weights @ jacobian, _reference(jacobian[[0, 2]]))


@pytest.mark.parametrize("jacobian", list(DEGENERATE_JACOBIANS.values()), ids=list(DEGENERATE_JACOBIANS))
def test_degenerate_inputs_give_finite_updates(jacobian: torch.Tensor) -> None:
    assert torch.isfinite(_update(jacobian)).all()


def test_one_much_longer_gradient_keeps_equal_cosines() -> None:
    jacobian = torch.tensor([[1e6, 2e6, 0.0], [-1.0, 0.5, 1.0]])
    cosines = torch.cosine_similarity(_update(jacobian)[None], jacobian, dim=1)
    torch.testing.assert_close(cosines[0], cosines[1], atol=1e-4, rtol=1e-4)


def _flat_grad(output: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(output, params, retain_graph=True)])


def test_end_to_end_through_the_balancer() -> None:
    model, (x, y) = TinyMTL(), make_data()
    _, losses = task_losses(model, x, y)
    shared = list(model.encoder.parameters())
    jacobian = torch.stack([_flat_grad(losses[k], shared) for k in range(3)])
    expected = _update(jacobian)
    tb.make("config", n_tasks=3).backward(losses, shared)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected)  # type: ignore[union-attr]
