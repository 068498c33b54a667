"""GradVac: adaptive cosine targets per pair, from the Gramian, against a direct loop over the gradients."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.gradvac import GradVac, vaccinate
from taskbalance.gradient_balancing.pcgrad import project_conflicting, random_orders
from tests.models import DEGENERATE_JACOBIANS, TinyMTL, make_data, task_losses


def _method(k: int, **options: object) -> GradVac:
    method = GradVac(**options)  # type: ignore[arg-type]
    method.setup(k)
    return method


def _jacobian(seed: int, k: int, p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


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
    jacobian = _jacobian(seed, 2, p)
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
    jacobian = _jacobian(seed, k, p)
    orders = random_orders(k, torch.Generator().manual_seed(seed))
    gram = jacobian @ jacobian.T
    coeffs, _ = vaccinate(gram, orders, torch.zeros(k, k, dtype=torch.float64), beta=0.01)
    torch.testing.assert_close(coeffs, project_conflicting(gram, orders))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_task_permutation_equivariance_with_matching_orders(seed: int, k: int, p: int) -> None:
    jacobian = _jacobian(seed, k, p)
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


def test_sum_convention_for_equal_gradients() -> None:
    g = torch.randn(6, generator=torch.Generator().manual_seed(0))
    jacobian = g.expand(4, 6)
    method = _method(4, beta=1.0)
    for _ in range(3):  # targets reach cos = 1 after the first step; equal gradients are never adjusted
        weights = method(jacobian @ jacobian.T, torch.ones(4)).weights
        assert weights is not None
        torch.testing.assert_close(weights @ jacobian, 4 * g)


@pytest.mark.parametrize("jacobian", list(DEGENERATE_JACOBIANS.values()), ids=list(DEGENERATE_JACOBIANS))
def test_degenerate_inputs_give_finite_updates(jacobian: torch.Tensor) -> None:
    k = jacobian.shape[0]
    method = _method(k, beta=0.5)
    for _ in range(3):
        weights = method(jacobian @ jacobian.T, torch.ones(k, dtype=jacobian.dtype)).weights
        assert weights is not None and weights.dtype == jacobian.dtype
        assert torch.isfinite(weights).all() and torch.isfinite(weights @ jacobian).all()
        assert torch.isfinite(method.targets).all() and method.targets.abs().max() <= 1


def test_state_round_trip_and_reset() -> None:
    generator = torch.Generator().manual_seed(5)
    grams = [j @ j.T for j in (torch.randn(5, 9, generator=generator) for _ in range(6))]
    method = _method(5, beta=0.2, seed=11)
    first = [method(g, torch.ones(5)).weights for g in grams[:3]]
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh = _method(5, beta=0.2, seed=99)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for g in grams[3:]:
        a, b = method(g, torch.ones(5)).weights, fresh(g, torch.ones(5)).weights
        assert a is not None and b is not None and torch.equal(a, b)
    assert torch.equal(method.targets, fresh.targets)
    method.reset()
    assert torch.equal(method.targets, torch.zeros(5, 5))
    replay = [method(g, torch.ones(5)).weights for g in grams[:3]]
    for a, b in zip(first, replay, strict=True):
        assert a is not None and b is not None and torch.equal(a, b)


def _flat_grad(output: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(output, params, retain_graph=True)])


def test_end_to_end_through_the_balancer() -> None:
    model, (x, y) = TinyMTL(), make_data()
    shared = list(model.encoder.parameters())
    reference = _method(3, seed=4, beta=0.5)
    balancer = tb.make("gradvac", n_tasks=3, seed=4, beta=0.5)
    for _ in range(2):  # the second step uses the targets of the first
        model.zero_grad(set_to_none=True)
        _, losses = task_losses(model, x, y)
        jacobian = torch.stack([_flat_grad(losses[k], shared) for k in range(3)])
        weights = reference(jacobian @ jacobian.T, losses.detach()).weights
        assert weights is not None
        balancer.backward(losses, shared)
        grads = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
        torch.testing.assert_close(grads, weights @ jacobian)
        with torch.no_grad():
            for p in model.parameters():
                assert p.grad is not None
                p.sub_(0.1 * p.grad)


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
