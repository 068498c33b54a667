"""IMGrad: its module docstring's recipe against an independent exact solve, rescalings, several Balancer steps.

Task permutation, dtypes, state and the Balancer path in general: tests/test_contract.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.imgrad import IMGrad
from tests import reference
from tests.models import TinyMTL, make_data, task_losses

F64 = torch.float64


def _method(k: int, **options: Any) -> IMGrad:
    return reference.set_up(IMGrad(**options), k)


def _brute_linear_plus_norm(gram: torch.Tensor, b: torch.Tensor, rho: float) -> torch.Tensor:
    """argmin_{w∈Δ} bᵀw + ρ√(wᵀGw), exactly: on each support S the stationarity conditions
    b_S + ρG_SS w_S/n = μ1 give w_S ∝ G_SS⁻¹(μ1 − b_S), with μ the larger root of a quadratic; keep the best."""
    k = gram.shape[0]

    def f(w: torch.Tensor) -> float:
        return float(w @ b + rho * (w @ gram @ w).clamp_min(0).sqrt())

    candidates = [torch.eye(k, dtype=F64)[i] for i in range(k)]
    for idx in reference.supports(k):
        if len(idx) < 2:
            continue
        sub = gram[idx][:, idx]
        if torch.linalg.matrix_rank(sub) < len(idx):
            continue
        a = torch.linalg.solve(sub, torch.ones(len(idx), dtype=F64))
        c = torch.linalg.solve(sub, b[idx])
        disc = float(a.sum() * (rho**2 - b[idx] @ c) + c.sum() ** 2)
        if rho <= 0 or disc < 0:
            continue
        mu = (float(c.sum()) + disc**0.5) / float(a.sum())
        y = (mu * a - c) / rho
        if y.sum() <= 0 or (y < 0).any():
            continue
        w = torch.zeros(k, dtype=F64)
        w[idx] = y / y.sum()
        candidates.append(w)
    return min(candidates, key=f)


def _reference(jac: torch.Tensor, alpha: float = 0.8) -> torch.Tensor:
    """The update of IMGrad's docstring (taskbalance.gradient_balancing.imgrad), computed step by step from J."""
    k = jac.shape[0]
    gram = jac @ jac.T
    g0 = jac.mean(0)
    gm = reference.brute_min_norm(gram) @ jac
    s = float(g0 @ gm / (g0.norm() * gm.norm())) if gm.norm() > 1e-12 else 0.0
    c = alpha * float(g0.norm())
    # min (1.5 − s)·g_wᵀg₀ + s·c·‖g_w‖  ⇔  min g_wᵀg₀ + (s·c/(1.5 − s))‖g_w‖
    w = _brute_linear_plus_norm(gram, gram.mean(1), s * c / (1.5 - s))
    gw = w @ jac
    gw_norm: torch.Tensor = torch.linalg.vector_norm(gw)
    return (g0 + c / gw_norm * gw) / (1 + alpha**2) * k


def test_hand_computed() -> None:
    # orthogonal unit gradients: g_m = g₀ (s = 1), w = (½, ½), d = 2(1 + α)g₀/(1 + α²)
    weights = reference.weights(_method(2), torch.eye(2, dtype=F64))
    torch.testing.assert_close(weights, torch.full((2,), 1.8 / 1.64, dtype=F64))
    # imbalance: g_m departs from g₀, s < 1
    jac = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=F64)
    s, _, _ = _method(2).imbalance_cosine(jac @ jac.T)
    gm = torch.tensor([1 / 17, 16 / 17], dtype=F64) @ jac
    torch.testing.assert_close(s, jac.mean(0) @ gm / (jac.mean(0).norm() * gm.norm()))
    assert 0 < float(s) < 1


@given(st.integers(0, 2**31), st.integers(2, 3), st.integers(0, 6), st.sampled_from([0.0, 1.0]))
def test_matches_an_independent_exact_computation(seed: int, k: int, extra: int, shift: float) -> None:
    jac = reference.jacobian(seed, k, k + extra, shift)  # independent rows, so that the brute-force MGDA is exact
    combination = _method(k)(jac @ jac.T, torch.ones(k, dtype=F64))
    assert combination.weights is not None
    if not combination.converged:  # only where 0 is in the hull of the gradients
        assert "Pareto-stationary" in combination.note
        return
    expected = _reference(jac)
    scale = float(jac.norm(dim=1).max())
    # The solver stops at a relative objective gap of 1e-9; where the optimum sits next to a face of the simplex,
    # w (and through c/‖g_w‖ the update) is only determined to ~√gap, e.g. seed 15985: objective equal to 6e-13,
    # update off by 1e-6 relative to the gradients' scale. Hence 1e-5 on the update.
    torch.testing.assert_close(combination.weights @ jac, expected, atol=1e-5 * scale, rtol=1e-4)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8), st.sampled_from([0.0, 0.8]))
def test_scaling_with_equal_gradients(seed: int, k: int, p: int, alpha: float) -> None:
    g = reference.jacobian(seed, 1, p)[0]
    jac = g.repeat(k, 1)
    for rescale, divisor in ((0, 1.0), (1, 1 + alpha * alpha), (2, 1 + alpha)):
        weights = reference.weights(_method(k, alpha=alpha, rescale=rescale), jac)
        torch.testing.assert_close(weights @ jac, k * (1 + alpha) / divisor * g)


def test_invariant_to_scaling_all_gradients() -> None:
    jac = reference.jacobian(3, 4, 7, 0.5)
    torch.testing.assert_close(reference.weights(_method(4), 1e-3 * jac), reference.weights(_method(4), jac))


def test_degenerate_inputs_converge_or_report_pareto_stationarity() -> None:
    g = reference.jacobian(0, 1, 6)[0]
    cases = {
        "zero": torch.zeros(3, 6, dtype=F64),
        "opposite": torch.stack([g, -2 * g]),
        "parallel": torch.stack([g, 3 * g]),
        "one zero": torch.stack([g, torch.zeros(6, dtype=F64), reference.jacobian(4, 1, 6)[0]]),
        "1e6 longer": torch.stack([1e6 * g, reference.jacobian(1, 1, 6)[0]]),
        "K=1": g[None],
        "K=40": reference.jacobian(2, 40, 30, 0.5),
        "float32": reference.jacobian(3, 4, 6).float(),
    }
    for name, jac in cases.items():
        combination = reference.combine(_method(jac.shape[0]), jac)
        assert combination.converged or "Pareto-stationary" in combination.note, (name, combination.note)
    # a zero gradient makes g_m = 0: s = 0 (as torch's cosine_similarity gives in the reference)
    jac = cases["one zero"]
    s, _, _ = _method(3).imbalance_cosine(jac @ jac.T)
    assert float(s) == 0.0


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="alpha"):
        IMGrad(alpha=-1.0)
    with pytest.raises(ValueError, match="rescale"):
        IMGrad(rescale=5)


def test_several_balancer_steps_match_the_step_by_step_reference() -> None:
    model, twin = TinyMTL(), TinyMTL()
    x, y = make_data()
    balancer = tb.make("imgrad", n_tasks=3, engine="loop")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        _, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters())
        # the reference: J by autograd, the docstring's update in float64, heads get ∇Σℓ
        _, ref_losses = task_losses(twin, x, y)
        shared, heads = list(twin.encoder.parameters()), list(twin.heads.parameters())
        update = _reference(reference.autograd_jacobian(ref_losses, shared).double()).float()
        reference.descend(shared, update, heads, torch.autograd.grad(ref_losses.sum(), heads), 0.05)
        optimizer.step()
        optimizer.zero_grad()
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
