"""GradVac: adaptive cosine targets per pair, from the Gramian, against a direct loop over the gradients.

The sum convention (β = 1 too), finite updates, state, reset and the Balancer path: tests/test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing.gradvac import GradVac, vaccinate
from taskbalance.gradient_balancing.pcgrad import project_conflicting, random_orders
from tests import reference
from tests.models import DEGENERATE_JACOBIANS


def _method(k: int, **options: object) -> GradVac:
    return reference.set_up(GradVac(**options), k)  # type: ignore[arg-type]


def _direct(
    jacobian: torch.Tensor, orders: torch.Tensor, targets: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's loop on the gradient vectors themselves (float64, plain Python control flow)."""
    targets = targets.clone()
    adjusted = jacobian.clone()
    for i in range(jacobian.shape[0]):
        for j in orders[i].tolist():
            gi, gj = adjusted[i], jacobian[j]
            floor = jacobian.shape[0] * torch.finfo(jacobian.dtype).eps * jacobian.norm(dim=1).max() ** 2
            if gi.norm() ** 2 <= floor or gj.norm() ** 2 <= floor:
                continue  # undefined cosine: neither adjusted nor tracked
            phi = min(max(float(gi @ gj / (gi.norm() * gj.norm())), -1.0), 1.0)
            t = float(targets[i, j])
            if phi < t:
                scale = gi.norm() * (t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2))
                adjusted[i] = gi + scale / (gj.norm() * math.sqrt(1 - t**2)) * gj
            targets[i, j] = (1 - beta) * t + beta * phi
    return adjusted.sum(dim=0), targets


@given(st.integers(0, 2**31), st.integers(2, 5), st.integers(1, 8))
def test_matches_the_direct_loop_over_two_steps(seed: int, k: int, p: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(k, k, dtype=torch.float64)
    expected_targets = targets
    for _ in range(2):
        jacobian = torch.randn(k, p, generator=generator, dtype=torch.float64)
        orders = random_orders(k, generator)
        coeffs, targets = vaccinate(jacobian @ jacobian.T, orders, targets, beta=0.5)
        expected, expected_targets = _direct(jacobian, orders, expected_targets, beta=0.5)
        torch.testing.assert_close(coeffs.sum(dim=0) @ jacobian, expected)
        torch.testing.assert_close(targets, expected_targets)


def test_hand_computed_two_steps() -> None:
    method = _method(2, beta=0.5)
    first = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # step 1, targets 0: PCGrad, g1' = (½, ½), g2' = (0, 1); targets become ½ · cos = −1/(2√2)
    weights = method(first @ first.T, torch.ones(2)).weights
    assert weights is not None
    torch.testing.assert_close(weights @ first, torch.tensor([0.5, 1.5], dtype=torch.float64))
    c = -1 / (2 * math.sqrt(2))
    torch.testing.assert_close(method.targets, torch.tensor([[0.0, c], [c, 0.0]], dtype=torch.float64))
    # step 2: orthogonal unit gradients, φ = 0 ≥ c: nothing to adjust, targets move halfway to 0
    second = torch.eye(2, dtype=torch.float64)
    weights = method(second, torch.ones(2)).weights
    assert weights is not None
    torch.testing.assert_close(weights, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(method.targets, torch.tensor([[0.0, c / 2], [c / 2, 0.0]], dtype=torch.float64))


@given(st.integers(0, 2**31), st.integers(2, 8), st.floats(-0.9, 0.9))  # p ≥ 2: in 1-D, cosines are ±1
def test_adjusted_pair_reaches_its_target(seed: int, p: int, target: float) -> None:
    jacobian = reference.jacobian(seed, 2, p)
    targets = torch.full((2, 2), target, dtype=torch.float64)
    coeffs, _ = vaccinate(jacobian @ jacobian.T, torch.tensor([[1], [0]]), targets, beta=0.01)
    adjusted = coeffs @ jacobian
    for i, j in ((0, 1), (1, 0)):
        before = torch.cosine_similarity(jacobian[i], jacobian[j], dim=0)
        after = torch.cosine_similarity(adjusted[i], jacobian[j], dim=0)
        expected = torch.tensor(target, dtype=torch.float64) if before < target else before
        torch.testing.assert_close(after, expected)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_zero_targets_reproduce_pcgrad(seed: int, k: int, p: int) -> None:
    jacobian = reference.jacobian(seed, k, p)
    orders = random_orders(k, torch.Generator().manual_seed(seed))
    gram = jacobian @ jacobian.T
    coeffs, _ = vaccinate(gram, orders, torch.zeros(k, k, dtype=torch.float64), beta=0.01)
    torch.testing.assert_close(coeffs, project_conflicting(gram, orders))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_task_permutation_equivariance_with_matching_orders(seed: int, k: int, p: int) -> None:
    jacobian = reference.jacobian(seed, k, p)
    generator = torch.Generator().manual_seed(seed)
    orders = random_orders(k, generator)
    targets = torch.rand(k, k, generator=generator, dtype=torch.float64) - 0.5
    perm = torch.randperm(k, generator=generator)
    inverse = perm.argsort()
    coeffs, new_targets = vaccinate(jacobian @ jacobian.T, orders, targets, beta=0.3)
    permuted, permuted_targets = vaccinate(
        jacobian[perm] @ jacobian[perm].T, inverse[orders[perm]], targets[perm][:, perm], beta=0.3
    )
    torch.testing.assert_close(permuted, coeffs[perm][:, perm])
    torch.testing.assert_close(permuted_targets, new_targets[perm][:, perm])


def test_ema_update_modes() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # cos = 1/√2, no conflict at target 0
    always, on_conflict = _method(2, beta=0.5), _method(2, beta=0.5, ema_update="on_conflict")
    always(jacobian @ jacobian.T, torch.ones(2))
    on_conflict(jacobian @ jacobian.T, torch.ones(2))
    half = 0.5 / math.sqrt(2)
    torch.testing.assert_close(always.targets, torch.tensor([[0.0, half], [half, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(on_conflict.targets, torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("jacobian", list(DEGENERATE_JACOBIANS.values()), ids=list(DEGENERATE_JACOBIANS))
def test_degenerate_inputs_give_finite_updates(jacobian: torch.Tensor) -> None:
    k = jacobian.shape[0]
    method = _method(k, beta=0.5)
    for _ in range(3):
        weights = method(jacobian @ jacobian.T, torch.ones(k, dtype=jacobian.dtype)).weights
        assert weights is not None and weights.dtype == jacobian.dtype
        assert torch.isfinite(weights).all() and torch.isfinite(weights @ jacobian).all()
        assert torch.isfinite(method.targets).all() and method.targets.abs().max() <= 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"ema_update": "sometimes"}, "ema_update"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradVac(**options)  # type: ignore[arg-type]
