"""Nash-MTL: Gα = 1/α by Newton, per-task scale invariance, failures reported and recovered from.

Task permutation, equal gradients (√K·g/‖g‖), dtypes, state and resume: tests/test_contract.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing.nash_mtl import NashMTL
from tests import reference

F64 = torch.float64


def _method(k: int, **options: Any) -> NashMTL:
    return reference.set_up(NashMTL(**options), k)


def _alpha(method: NashMTL, jac: torch.Tensor) -> torch.Tensor:
    return reference.weights(method, jac)


def test_hand_computed() -> None:
    # orthogonal gradients: Gα = 1/α gives α_k = 1/‖g_k‖, d = Σ_k g_k/‖g_k‖
    jac = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(_alpha(_method(2), jac), torch.tensor([0.5, 1.0], dtype=F64))
    # torchjd's documented example (its NashMTL, max_norm=1): the clipped update is (0.0542, 0.7061, 0.7061)
    jac = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=F64)
    update = _alpha(_method(2), jac) @ jac
    torch.testing.assert_close(update.norm(), torch.tensor(2.0, dtype=F64).sqrt())
    torch.testing.assert_close(
        update / update.norm(), torch.tensor([0.0542, 0.7061, 0.7061], dtype=F64), atol=1e-4, rtol=0
    )


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(0, 6), st.sampled_from([0.0, 1.0, 5.0]))
def test_solves_the_bargaining_system(seed: int, k: int, extra: int, shift: float) -> None:
    jac = reference.jacobian(seed, k, k + extra, shift)  # independent rows: 0 is not in their hull
    gram = jac @ jac.T
    alpha = _alpha(_method(k), jac)
    assert (alpha > 0).all()
    torch.testing.assert_close(alpha * (gram @ alpha), torch.ones(k, dtype=F64), atol=1e-8, rtol=0)
    # hence every task gets the same "utility" α_k g_kᵀd = 1 and ‖d‖² = K
    torch.testing.assert_close((alpha @ jac).norm() ** 2, torch.tensor(float(k), dtype=F64))


@given(st.integers(0, 2**31), st.integers(2, 6))
def test_per_task_scaling_leaves_the_update_unchanged(seed: int, k: int) -> None:
    jac = reference.jacobian(seed, k, k + 3, 1.0)
    scales = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) * 100 + 0.01
    base = _alpha(_method(k), jac)
    scaled = _alpha(_method(k), scales[:, None] * jac)
    torch.testing.assert_close(scaled, base / scales)
    torch.testing.assert_close(scaled @ (scales[:, None] * jac), base @ jac)


def test_degenerate_inputs_are_finite_and_reported() -> None:
    g = reference.jacobian(0, 1, 6)[0]
    h = reference.jacobian(1, 1, 6)[0]
    # a zero gradient: no solution (α_k → ∞ on a zero vector); it gets 0, the others are solved exactly
    jac = torch.stack([g, torch.zeros(6, dtype=F64), h])
    combination = _method(3)(jac @ jac.T, torch.ones(3, dtype=F64))
    assert not combination.converged and "zero gradient for task(s) [1]" in combination.note
    assert combination.weights is not None
    assert combination.weights[1] == 0
    torch.testing.assert_close(combination.weights[[0, 2]], _alpha(_method(2), jac[[0, 2]]))
    # all zero, and exactly opposite gradients (0 in the hull: F is unbounded below)
    for jac, message in ((torch.zeros(2, 6, dtype=F64), "all gradients"), (torch.stack([g, -2 * g]), "Newton")):
        combination = _method(2)(jac @ jac.T, torch.ones(2, dtype=F64))
        assert not combination.converged and message in combination.note
        assert combination.weights is not None and torch.isfinite(combination.weights).all()
    # well-posed but extreme: one gradient 1e6 times longer, K = 1, K = 40, float32
    for jac in (
        torch.stack([1e6 * g, h]),
        g[None],
        reference.jacobian(2, 40, 50, 0.5),
        reference.jacobian(3, 4, 6).float(),
    ):
        alpha = _alpha(_method(jac.shape[0]), jac)
        assert alpha.dtype == jac.dtype
        product = alpha.double() * ((jac @ jac.T).double() @ alpha.double())
        tol = 1e-8 if jac.dtype == F64 else 1e-4
        torch.testing.assert_close(product, torch.ones(jac.shape[0], dtype=F64), atol=tol, rtol=0)


def test_failure_drops_the_warm_start_and_recovers() -> None:
    method = _method(2)
    g = reference.jacobian(0, 1, 6)[0]
    bad = torch.stack([g, -g])
    method(bad @ bad.T, torch.ones(2, dtype=F64))
    assert reference.same(method.state_dict(), _method(2).state_dict())
    good = reference.jacobian(1, 2, 6)
    torch.testing.assert_close(_alpha(method, good), _alpha(_method(2), good))


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="optim_niter"):
        NashMTL(optim_niter=0)
    with pytest.raises(ValueError, match="max_norm"):
        NashMTL(max_norm=-1.0)
    assert NashMTL().max_norm == 1.0
