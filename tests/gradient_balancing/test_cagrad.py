"""CAGrad: the dual solved from G, the closed-form update, the ball constraint, its rescalings, degenerate cases.

Task permutation, dtypes, state and the Balancer path: tests/test_contract.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing.cagrad import CAGrad
from tests import reference

F64 = torch.float64


def _method(k: int, **options: Any) -> CAGrad:
    return reference.set_up(CAGrad(**options), k)


def _dual(w: torch.Tensor, jac: torch.Tensor, c: float) -> torch.Tensor:
    """g_wᵀg₀ + c‖g₀‖‖g_w‖ for a batch of w (..., K)."""
    g0 = jac.mean(0)
    gw = w @ jac
    g0_norm: torch.Tensor = torch.linalg.vector_norm(g0)
    gw_norm: torch.Tensor = torch.linalg.vector_norm(gw, dim=-1)
    return gw @ g0 + c * g0_norm * gw_norm


def test_hand_computed() -> None:
    # orthogonal unit gradients: w = (½, ½) by symmetry, g_w = g₀, d = 2(1 + c)g₀/(1 + c²)
    jac = torch.eye(2, dtype=F64)
    weights = reference.weights(_method(2), jac)
    torch.testing.assert_close(weights, torch.full((2,), 1.4 / 1.16, dtype=F64))
    # c = 0 is gradient descent on Σℓ̃
    torch.testing.assert_close(reference.weights(_method(2, c=0.0), jac), torch.ones(2, dtype=F64))


@given(
    st.integers(0, 2**31),
    st.integers(2, 3),
    st.integers(1, 8),
    st.sampled_from([0.1, 0.4, 0.9]),
    st.sampled_from([0.0, 1.0]),
)
def test_update_is_the_closed_form_of_the_optimal_dual(seed: int, k: int, p: int, c: float, shift: float) -> None:
    jac = reference.jacobian(seed, k, p, shift)
    g0 = jac.mean(0)
    combination = _method(k, c=c)(jac @ jac.T, torch.ones(k, dtype=F64))
    assert combination.weights is not None
    if not combination.converged:  # only where 0 is in the hull of the gradients
        assert "Pareto-stationary" in combination.note
        return
    direction = combination.weights @ jac * (1 + c * c) / k  # d = g₀ + (c‖g₀‖/‖g_w‖)g_w
    w = combination.weights * (1 + c * c) - 1  # ∝ the solved w
    w = w / w.sum()
    gw = w @ jac
    torch.testing.assert_close(direction, g0 + c * g0.norm() / gw.norm() * gw)
    # d lies on the ball ‖d − g₀‖ ≤ c‖g₀‖ (on its boundary)
    assert float((direction - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)
    # the solved w beats a fine grid, and strong duality: min_k g_kᵀd equals the dual optimum
    grid_best = float(_dual(reference.simplex_grid(k, 4000 if k == 2 else 150), jac, c).min())
    scale = float(jac.norm(dim=1).max()) ** 2
    assert float(_dual(w, jac, c)) <= grid_best + 1e-9 * scale
    torch.testing.assert_close((jac @ direction).min(), _dual(w, jac, c), atol=1e-8 * scale, rtol=1e-8)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8), st.sampled_from([0.0, 0.4, 1.0]))
def test_scaling_with_equal_gradients(seed: int, k: int, p: int, c: float) -> None:
    g = reference.jacobian(seed, 1, p)[0]
    jac = g.repeat(k, 1)
    for rescale, divisor in ((0, 1.0), (1, 1 + c * c), (2, 1 + c)):
        weights = reference.weights(_method(k, c=c, rescale=rescale), jac)
        torch.testing.assert_close(weights @ jac, k * (1 + c) / divisor * g)


def test_invariant_to_scaling_all_gradients() -> None:
    jac = reference.jacobian(3, 4, 7)
    torch.testing.assert_close(reference.weights(_method(4), 1e3 * jac), reference.weights(_method(4), jac))


def test_convergence_flags_and_fallback_on_degenerate_inputs() -> None:
    g = reference.jacobian(0, 1, 6)[0]
    cases = {
        "zero": (torch.zeros(3, 6, dtype=F64), True),
        "opposite equal": (torch.stack([g, -g]), True),
        "opposite": (torch.stack([g, -2 * g]), True),
        "parallel": (torch.stack([g, 3 * g]), True),
        "1e6 longer": (torch.stack([1e6 * g, reference.jacobian(1, 1, 6)[0]]), True),
        "K=1": (g[None], True),
        "K=40": (reference.jacobian(2, 40, 30, 0.5), True),
        "float32": (reference.jacobian(3, 4, 6).float(), True),
        "one zero": (torch.stack([g, torch.zeros(6, dtype=F64), reference.jacobian(4, 1, 6)[0]]), False),
    }
    for name, (jac, converged) in cases.items():
        combination = reference.combine(_method(jac.shape[0]), jac)
        assert combination.converged == converged, (name, combination.note)
    # a zero gradient: 0 is the optimal g_w, d is not unique; the fallback is K·g₀/(1 + c²)
    jac = cases["one zero"][0]
    combination = _method(3)(jac @ jac.T, torch.ones(3, dtype=F64))
    assert "Pareto-stationary" in combination.note
    assert combination.weights is not None
    torch.testing.assert_close(combination.weights, torch.full((3,), 1 / 1.16, dtype=F64))
    torch.testing.assert_close(reference.weights(_method(1), g[None]), torch.full((1,), 1.4 / 1.16, dtype=F64))


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(c=-0.1)
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)
