"""FairGrad: w > 0 with G w = w^(−1/α), by damped Newton on G alone; a clear failure when no solution exists.

Task permutation, equal gradients, degenerate inputs (several α), state and the Balancer path (clipped to
max_norm): tests/test_contract.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.base import Combination
from taskbalance.gradient_balancing.fairgrad import FairGrad
from tests import reference


def _combine(gram: torch.Tensor, alpha: float = 1.0) -> Combination:
    method = reference.set_up(FairGrad(alpha=alpha), gram.shape[0])
    combination: Combination = method(gram, torch.ones(gram.shape[0], dtype=gram.dtype))
    return combination


def _weights(jacobian: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    combination = _combine(jacobian @ jacobian.T, alpha)
    assert combination.weights is not None and combination.weights.dtype == jacobian.dtype
    return combination.weights


def test_hand_computed() -> None:
    orthogonal = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    # G = diag(4, ¼): α = 1 gives w_k = 1/‖g_k‖; α = 2 gives ‖g_k‖² w_k = w_k^(−½), w_k = ‖g_k‖^(−4/3)
    # (the solver stops at a relative residual of 1e-6)
    torch.testing.assert_close(_weights(orthogonal), torch.tensor([0.5, 2.0], dtype=torch.float64), rtol=1e-6, atol=0)
    expected = torch.tensor([2.0, 0.5], dtype=torch.float64).pow(-4 / 3)
    torch.testing.assert_close(_weights(orthogonal, alpha=2.0), expected, rtol=1e-6, atol=0)
    # unit gradients with cosine c: by symmetry w₁ = w₂ = w, w (1 + c) = 1/w
    c = 0.6
    gram = torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64)
    weights = _combine(gram).weights
    assert weights is not None
    torch.testing.assert_close(weights, torch.full((2,), (1 + c) ** -0.5, dtype=torch.float64), rtol=1e-6, atol=0)


@given(
    st.integers(0, 2**31),
    st.integers(1, 6),
    st.integers(0, 6),
    st.sampled_from([0.5, 1.0, 2.0, 5.0]),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_solves_the_fairness_condition(seed: int, k: int, extra: int, alpha: float, dtype: torch.dtype) -> None:
    jacobian = reference.jacobian(seed, k, k + extra, dtype=dtype)  # full row rank: a solution exists
    gram = jacobian @ jacobian.T
    combination = _combine(gram, alpha)
    assert combination.converged and combination.note == ""
    weights = combination.weights
    assert weights is not None and (weights > 0).all()
    lhs, rhs = gram.double() @ weights.double(), weights.double().pow(-1 / alpha)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-5
    torch.testing.assert_close(lhs / rhs, torch.ones(k, dtype=torch.float64), atol=tolerance, rtol=0)
    # hence ‖Jᵀw‖² = Σ_k w_k (Gw)_k = Σ_k w_k^(1−1/α), which is K for α = 1
    sq_norm = weights.double() @ lhs
    torch.testing.assert_close(sq_norm, weights.double().pow(1 - 1 / alpha).sum(), atol=0, rtol=tolerance)


@given(st.integers(0, 2**31), st.integers(1, 5), st.integers(0, 4))
def test_alpha_one_update_is_invariant_to_task_scales(seed: int, k: int, extra: int) -> None:
    jacobian = reference.jacobian(seed, k, k + extra)
    scales = torch.rand(k, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 100 + 0.01
    update = _weights(jacobian) @ jacobian
    torch.testing.assert_close(_weights(scales * jacobian) @ (scales * jacobian), update)


def test_no_solution_is_reported_and_gives_no_update() -> None:
    for jacobian in (torch.tensor([[1.0, 2.0], [-1.0, -2.0]]), reference.jacobian(0, 40, 7, dtype=torch.float32)):
        combination = _combine(jacobian @ jacobian.T)
        assert not combination.converged and "no w > 0" in combination.note
        assert combination.weights is not None
        torch.testing.assert_close(combination.weights, torch.zeros(jacobian.shape[0]))


def test_zero_gradient_gets_zero_weight_and_the_others_are_solved() -> None:
    jacobian = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    combination = _combine(jacobian @ jacobian.T)
    assert combination.converged
    assert combination.weights is not None
    torch.testing.assert_close(combination.weights, torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64))


def test_iteration_limit_is_reported() -> None:
    jacobian = reference.jacobian(3, 4, 6)
    method = reference.set_up(FairGrad(max_iter=1), 4)
    combination = method(jacobian @ jacobian.T, torch.ones(4))
    assert not combination.converged and "last Newton iterate" in combination.note
    assert combination.weights is not None and (combination.weights > 0).all()


def test_one_much_longer_gradient_is_solved() -> None:
    jacobian = torch.tensor([[1e6, 2e6, 0.0], [-1.0, 0.5, 1.0]], dtype=torch.float64)
    weights = _weights(jacobian)
    gram = jacobian @ jacobian.T
    torch.testing.assert_close(gram @ weights * weights, torch.ones(2, dtype=torch.float64))


def test_failure_reaches_the_balance_result_with_one_warning() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = tb.Balancer(gradient=FairGrad(), n_tasks=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            losses = torch.stack([(weight * torch.tensor([1.0, 1.0])).sum(), -(weight.sum()) + 10])
            result = balancer.backward(losses, [weight])
            assert not result.converged and "no w > 0" in result.note
    assert sum("FairGrad" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(weight.grad, torch.zeros(2))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"alpha": 0.0}, "alpha"), ({"tol": 0.0}, "tol"), ({"max_iter": 0}, "max_iter"), ({"max_norm": -1.0}, "max_norm")],
)
def test_bad_options_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FairGrad(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_warm_started_steps_at_k40_solve_the_fairness_condition(alpha: float) -> None:
    """Each step starts from the previous solution (kept in the state); every step must still satisfy
    (G w)_k = w_k^(−1/α) to the tolerance, and agree with a cold solve of the same G."""
    gen = torch.Generator().manual_seed(5)
    shared, private = torch.randn(300, generator=gen, dtype=torch.float64), reference.jacobian(6, 40, 300)
    scales = torch.logspace(-1, 1, 40, dtype=torch.float64)
    method = reference.set_up(FairGrad(alpha=alpha), 40)
    fresh = method.state_dict()
    for _ in range(4):
        jac = scales[:, None] * (0.7 * shared + 0.7 * private)
        gram = jac @ jac.T
        combination: Combination = method(gram, torch.ones(40, dtype=torch.float64))
        assert combination.converged and combination.weights is not None
        w = combination.weights
        target = w.pow(-1 / alpha)
        assert ((gram @ w - target) / target).abs().max() <= 1e-6
        torch.testing.assert_close(w, _weights(jac, alpha), rtol=1e-5, atol=0)
        assert not reference.same(method.state_dict(), fresh)  # the solution is kept as the next warm start
        shared = shared + 0.05 * torch.randn(300, generator=gen, dtype=torch.float64)
        private = private + 0.05 * torch.randn(40, 300, generator=gen, dtype=torch.float64)
