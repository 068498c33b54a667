"""IMTL-G: equal projections on the unit gradients, the paper's form, scaling, degenerate inputs, Balancer path.

Task permutation, the sum convention, dtypes and state: tests/test_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.imtl_g import IMTLG
from tests import reference
from tests.models import TinyMTL, make_data, task_losses

F64 = torch.float64


def _method(k: int) -> IMTLG:
    return reference.set_up(IMTLG(), k)


def _weights(jac: torch.Tensor) -> torch.Tensor:
    return reference.weights(_method(jac.shape[0]), jac)


def test_hand_computed() -> None:
    # g₁ = (1, 0), g₂ = (0, 2): equal projections on e₁, e₂ need d ∝ (1, 1): α = (½, ¼)/(¾) = (⅔, ⅓), ×2
    jac = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    weights = _weights(jac)
    torch.testing.assert_close(weights, torch.tensor([4 / 3, 2 / 3], dtype=F64))
    torch.testing.assert_close(weights @ jac, torch.tensor([4 / 3, 4 / 3], dtype=F64))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(0, 6), st.sampled_from([0.0, 1.0]))
def test_equal_projections_on_unit_gradients(seed: int, k: int, extra: int, shift: float) -> None:
    jac = reference.jacobian(seed, k, k + extra, shift)
    weights = _weights(jac)
    torch.testing.assert_close(weights.sum(), torch.tensor(float(k), dtype=F64))
    units = jac / jac.norm(dim=1, keepdim=True)
    projections = units @ (weights @ jac)
    scale = float(projections.abs().max())
    torch.testing.assert_close(projections, projections.mean().expand(k), atol=1e-7 * scale, rtol=0)


@given(st.integers(0, 2**31), st.integers(2, 5))
def test_matches_the_papers_closed_form(seed: int, k: int) -> None:
    # α₂..K = g₁ᵀUᵀ(DUᵀ)⁻¹ with D, U the differences g₁ − g_k and u₁ − u_k; α₁ = 1 − Σα₂..K
    jac = reference.jacobian(seed, k, k + 3, 0.5)
    units = jac / jac.norm(dim=1, keepdim=True)
    d, u = jac[0] - jac[1:], units[0] - units[1:]
    tail = jac[0] @ u.T @ torch.linalg.inv(d @ u.T)
    alpha = torch.cat([1 - tail.sum(0, keepdim=True), tail])
    torch.testing.assert_close(_weights(jac), k * alpha, rtol=1e-7, atol=1e-9)


@given(st.integers(0, 2**31), st.integers(2, 6))
def test_invariant_to_scaling_all_gradients(seed: int, k: int) -> None:
    jac = reference.jacobian(seed, k, k + 2, 0.5)
    torch.testing.assert_close(_weights(1e4 * jac), _weights(jac))


def test_degenerate_inputs() -> None:
    g = reference.jacobian(0, 1, 6)[0]
    h = reference.jacobian(1, 1, 6)[0]
    # a zero gradient has no direction: it is left out with weight 0
    jac = torch.stack([g, torch.zeros(6, dtype=F64), h])
    weights = _weights(jac)
    assert weights[1] == 0
    torch.testing.assert_close(weights[[0, 2]] * 2 / 3, _weights(jac[[0, 2]]))
    torch.testing.assert_close(_weights(torch.zeros(3, 6, dtype=F64)), torch.ones(3, dtype=F64))
    # opposite equal gradients: only d = 0 has equal projections; parallel ones: any α does, the unit
    # gradients share evenly (α_k‖g_k‖ equal)
    opposite = torch.stack([g, -g])
    torch.testing.assert_close(_weights(opposite) @ opposite, torch.zeros(6, dtype=F64), atol=1e-7, rtol=0)
    torch.testing.assert_close(_weights(torch.stack([g, 3 * g])), torch.tensor([1.5, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="non-finite"):
        _method(2)(torch.full((2, 2), float("nan")), torch.ones(2))


def test_through_the_balancer_projections_are_equal() -> None:
    model = TinyMTL()
    x, y = make_data()
    shared = list(model.encoder.parameters())
    _, losses = task_losses(model, x, y)
    jac = reference.autograd_jacobian(losses, shared)
    result = tb.make("imtl_g", n_tasks=3, engine="loop").backward(losses, shared)
    units = jac / jac.norm(dim=1, keepdim=True)
    projections = units @ reference.accumulated(shared)
    torch.testing.assert_close(projections, projections.mean().expand(3), rtol=1e-4, atol=1e-6)
    assert result.gradient_weights is not None
    torch.testing.assert_close(result.gradient_weights.sum(), torch.tensor(3.0))
