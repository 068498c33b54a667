"""MoCo: tracked gradients, one projected step on λ per iteration, update K · yᵀλ; state y, λ, t.

Task permutation, the tracking of equal gradients, degenerate inputs (both λ updates), state, reset and the
Balancer path: tests/test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing import moco
from taskbalance.gradient_balancing.base import Combination
from taskbalance.gradient_balancing.moco import MoCo
from taskbalance.solvers import project_simplex
from tests import reference


def _method(k: int, **options: object) -> MoCo:
    return reference.set_up(MoCo(**options), k)  # type: ignore[arg-type]


def _step(method: MoCo, jacobian: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    k = jacobian.shape[0]
    combination: Combination = method(jacobian, torch.ones(k, dtype=jacobian.dtype) if losses is None else losses)
    assert combination.direction is not None and combination.weights is not None
    torch.testing.assert_close(combination.weights, k * method.lambd)
    return combination.direction


def _simplex2(a: float, b: float) -> tuple[float, float]:
    """Projection of (a, b) onto {λ ≥ 0, λ₁ + λ₂ = 1}, by hand."""
    first = min(max((1 + a - b) / 2, 0.0), 1.0)
    return first, 1 - first


def test_hand_computed_two_steps() -> None:
    j1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
    j2 = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    method = _method(2)
    # step 1: β₁ = 0.5, γ₁ = 0.1, y = ½ J₁
    y = 0.5 * j1
    gram = (y @ y.T).tolist()
    a = 0.5 - 0.1 * (gram[0][0] * 0.5 + gram[0][1] * 0.5)
    b = 0.5 - 0.1 * (gram[1][0] * 0.5 + gram[1][1] * 0.5)
    lam = _simplex2(a, b)
    expected = 2 * (lam[0] * y[0] + lam[1] * y[1])
    torch.testing.assert_close(_step(method, j1), expected)
    # step 2: β₂ = 0.5/√2, γ₂ = 0.1/√2
    beta, gamma = 0.5 / math.sqrt(2), 0.1 / math.sqrt(2)
    y = y - beta * (y - j2)
    gram = (y @ y.T).tolist()
    a = lam[0] - gamma * (gram[0][0] * lam[0] + gram[0][1] * lam[1])
    b = lam[1] - gamma * (gram[1][0] * lam[0] + gram[1][1] * lam[1])
    lam = _simplex2(a, b)
    torch.testing.assert_close(_step(method, j2), 2 * (lam[0] * y[0] + lam[1] * y[1]))
    torch.testing.assert_close(method.tracked, y)
    assert method.step == 2


def test_libmtl_variant_softmax_and_normalisation() -> None:
    jacobian = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
    method = _method(2, lambda_update="softmax", normalize=True, rho=0.1)
    # g_k/‖g_k‖ · ℓ̃_k, then y = ½ of that, λ = softmax(λ₀ − 0.1 (y yᵀ + ρ I) λ₀)
    normalised = torch.tensor([[1.2, 1.6], [0.0, 0.5]], dtype=torch.float64)
    y = 0.5 * normalised
    lam0 = torch.full((2,), 0.5, dtype=torch.float64)
    lam = torch.softmax(lam0 - 0.1 * (y @ y.T + 0.1 * torch.eye(2, dtype=torch.float64)) @ lam0, dim=0)
    torch.testing.assert_close(_step(method, jacobian, losses), 2 * lam @ y, atol=1e-7, rtol=1e-6)


@given(st.lists(st.floats(-10, 10), min_size=1, max_size=8))
def test_simplex_projection_is_the_closest_point(values: list[float]) -> None:
    v = torch.tensor(values, dtype=torch.float64)
    p = project_simplex(v)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    # optimality: (v − p)·(q − p) ≤ 0 for every point q of the simplex, enough to check at the vertices
    vertices = torch.eye(len(values), dtype=torch.float64)
    assert ((vertices - p) @ (v - p) <= 1e-12).all()


@given(
    st.integers(0, 2**31),
    st.integers(1, 5),
    st.integers(1, 30),
    st.integers(1, 40),
    st.booleans(),
    st.sampled_from([0.3, 0.8, 1.0]),
)
def test_column_blocks_give_the_dense_recursion(
    seed: int, k: int, p: int, block: int, normalize: bool, beta: float
) -> None:
    generator = torch.Generator().manual_seed(seed)
    lambda_update = "softmax" if normalize else "projection"
    method = _method(k, beta=beta, rho=0.1, normalize=normalize, lambda_update=lambda_update)
    y, lam = torch.zeros(k, p, dtype=torch.float64), torch.full((k,), 1 / k, dtype=torch.float64)
    for t in range(1, 4):  # the dense recursion of the docstring, with y yᵀ formed
        jacobian = torch.randn(k, p, generator=generator, dtype=torch.float64)
        losses = torch.rand(k, generator=generator, dtype=torch.float64) + 0.5
        original = jacobian.clone()
        with pytest.MonkeyPatch.context() as patch:  # blocks of a few columns, the last one ragged
            patch.setattr(moco, "_BLOCK_ELEMENTS", block)
            update = _step(method, jacobian, losses)
        assert torch.equal(jacobian, original)  # J is the engine's buffer: read, never written
        g = jacobian / (torch.linalg.vector_norm(jacobian, dim=1, keepdim=True) + 1e-8) * losses[:, None]
        y = y - beta / t**0.5 * (y - (g if normalize else jacobian))
        stepped = lam - 0.1 / t**0.5 * (y @ y.T + 0.1 * torch.eye(k, dtype=torch.float64)) @ lam
        lam = torch.softmax(stepped, dim=0) if normalize else project_simplex(stepped)
        torch.testing.assert_close(method.tracked, y)
        torch.testing.assert_close(method.lambd, lam)
        torch.testing.assert_close(update, k * lam @ y)


def test_saved_state_is_not_changed_by_later_steps() -> None:
    # y is updated in place, so the state handed out (and the state loaded) must be copies
    generator = torch.Generator().manual_seed(3)
    method, fresh = _method(2), _method(2)
    _step(method, torch.randn(2, 6, generator=generator))
    state = method.state_dict()
    saved = state["_extra_state"]["tracked"].clone()
    fresh.load_state_dict(state)
    _step(method, torch.randn(2, 6, generator=generator))
    _step(fresh, torch.randn(2, 6, generator=generator))
    assert torch.equal(state["_extra_state"]["tracked"], saved)


def test_sum_convention_holds_once_the_tracking_has_caught_up() -> None:
    g = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    method = _method(3)
    first = _step(method, g.expand(3, 5))
    torch.testing.assert_close(first, 3 * 0.5 * g)  # y₁ = β g: the first update is short
    for _ in range(60):
        update = _step(method, g.expand(3, 5))
    torch.testing.assert_close(update, 3 * g, rtol=1e-3, atol=1e-3)


def test_changed_gradient_size_is_refused() -> None:
    method = _method(2)
    _step(method, torch.ones(2, 3))
    with pytest.raises(ValueError, match="must not change"):
        _step(method, torch.ones(2, 4))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 2.0}, "beta"),
        ({"gamma": 0.0}, "gamma"),
        ({"beta_sigma": -1.0}, "beta_sigma"),
        ({"gamma_sigma": -0.5}, "gamma_sigma"),
        ({"rho": -1.0}, "rho"),
        ({"lambda_update": "exp"}, "lambda_update"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoCo(**options)  # type: ignore[arg-type]


def _weights_under_loss_scales(spec: str, steps: int = 20) -> torch.Tensor:
    """K·λ per step (steps × 3) for L_k = s_k (½‖A_k θ − b_k‖² + 0.1), s = (1e-6, 1, 1e6), aligned gradients."""
    gen = torch.Generator().manual_seed(0)
    p = 8
    a = torch.eye(p, dtype=torch.float64) + 0.1 * torch.randn(3, p, p, generator=gen, dtype=torch.float64)
    b = 1 + 0.1 * torch.randn(3, p, generator=gen, dtype=torch.float64)
    scales = torch.tensor([1e-6, 1.0, 1e6], dtype=torch.float64)
    theta = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    balancer = tb.make(spec, n_tasks=3).double()
    weights = []
    for _ in range(steps):
        result = balancer.backward(scales * (0.5 * ((a @ theta - b) ** 2).sum(1) + 0.1), [theta])
        assert result.gradient_weights is not None and theta.grad is not None
        weights.append(result.gradient_weights)
        with torch.no_grad():
            theta -= 1e-2 * theta.grad / theta.grad.norm()
            theta.grad = None
    return torch.stack(weights)


@pytest.mark.parametrize("spec", ["moco", "moco[normalize=true]"])
def test_dominant_loss_scale_gets_weight_zero(spec: str) -> None:
    """The documented behaviour: min-norm descent puts all of λ on the smallest gradient, normalised or not."""
    weights = _weights_under_loss_scales(spec)
    assert (weights == torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)).all()


def test_softmax_update_drops_the_dominant_scale_every_other_step() -> None:
    weights = _weights_under_loss_scales("moco[lambda_update=softmax]")
    assert (weights[::2, 2] == 0).all()


def test_log_losses_keep_every_task_weighted() -> None:
    """The documented remedy, si+moco: no loss scale reaches λ, every K·λ_k stays near 1."""
    weights = _weights_under_loss_scales("si+moco")
    assert (weights > 0.5).all() and (weights < 1.5).all()
