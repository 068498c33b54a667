"""UPGrad: dual-cone projections from G against a brute-force projection from J, no conflict, torchjd's options.

Task permutation, the sum convention, dtypes, state and the Balancer path: tests/test_contract.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing.upgrad import UPGrad
from tests import reference

F64 = torch.float64


def _method(k: int, **options: Any) -> UPGrad:
    return reference.set_up(UPGrad(**options), k)


def _weights(jac: torch.Tensor, **options: Any) -> torch.Tensor:
    return reference.weights(_method(jac.shape[0], **options), jac)


def _project_on_dual_cone(x: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    """argmin ‖y − x‖ s.t. Jy ≥ 0, by trying every set of active constraints (small K, rows independent)."""
    k = jac.shape[0]
    best, best_y = float("inf"), x
    for size in range(k + 1):
        for active in itertools.combinations(range(k), size):
            idx = list(active)
            y = x.clone()
            if idx:
                rows = jac[idx]
                multipliers = torch.linalg.solve(rows @ rows.T, rows @ x)
                y = x - multipliers @ rows
            if (jac @ y >= -1e-10).all() and float((y - x).norm()) < best:
                best, best_y = float((y - x).norm()), y
    return best_y


def test_hand_computed() -> None:
    # g₁ = (1, 0), g₂ = (−1, 1): π(g₁) = (½, ½) = g₁ + ½g₂, π(g₂) = (0, 1) = g₁ + g₂
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    weights = _weights(jac)
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5], dtype=F64))
    torch.testing.assert_close(weights @ jac, torch.tensor([0.5, 1.5], dtype=F64))


@given(st.integers(0, 2**31), st.integers(1, 4), st.integers(0, 5), st.sampled_from([0.0, 1.0]))
def test_sum_of_projections_onto_the_dual_cone(seed: int, k: int, extra: int, shift: float) -> None:
    jac = reference.jacobian(seed, k, k + extra, shift)
    update = _weights(jac) @ jac
    expected = sum(_project_on_dual_cone(g, jac) for g in jac)
    scale = float(jac.norm(dim=1).max())
    torch.testing.assert_close(update, expected, atol=1e-8 * scale, rtol=1e-7)


@given(st.integers(0, 2**31), st.integers(1, 8), st.integers(1, 12), st.sampled_from([0.0, 1.0]))
def test_no_task_is_harmed(seed: int, k: int, p: int, shift: float) -> None:
    jac = reference.jacobian(seed, k, p, shift)
    update = _weights(jac) @ jac
    assert (jac @ update >= -1e-9 * float(jac.norm(dim=1).max()) ** 2).all()


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_without_conflict_the_update_is_the_sum(seed: int, k: int, p: int) -> None:
    jac = reference.jacobian(seed, k, p).abs()  # non-negative entries: every g_k is in the dual cone
    torch.testing.assert_close(_weights(jac), torch.ones(k, dtype=F64))


@given(st.integers(0, 2**31), st.integers(2, 6), st.integers(2, 10))
def test_scale_invariance(seed: int, k: int, p: int) -> None:
    jac = reference.jacobian(seed, k, p, 0.5)
    base = _weights(jac)
    scale = float(jac.norm(dim=1).max())
    torch.testing.assert_close(_weights(1e-5 * jac) @ jac, base @ jac, atol=1e-8 * scale, rtol=1e-7)


def test_torchjd_options() -> None:
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    gram = jac @ jac.T
    # torchjd: G/trace + 1e-4·I, projections of e_k/K summed; ours sums e_k: K times torchjd's weights
    normalized = gram / gram.trace() + 1e-4 * torch.eye(2, dtype=F64)
    expected = torch.zeros(2, dtype=F64)
    for k in range(2):  # the ridged problems, each solved on its active set {k} ∪ free: here all free but k
        other = 1 - k
        v = torch.zeros(2, dtype=F64)
        v[k] = 1.0
        v[other] = max(0.0, float(-normalized[other, k] / normalized[other, other]))
        expected += v
    torch.testing.assert_close(_weights(jac, norm_eps=1e-4, reg_eps=1e-4), expected)
    # below norm_eps (trace of G) torchjd stops projecting: the plain sum
    torch.testing.assert_close(_weights(1e-3 * jac, norm_eps=1e-4), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="norm_eps"):
        UPGrad(norm_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps"):
        UPGrad(reg_eps=-1.0)


def test_degenerate_inputs() -> None:
    g = reference.jacobian(0, 1, 6)[0]
    h = reference.jacobian(1, 1, 6)[0]
    torch.testing.assert_close(_weights(torch.zeros(3, 6, dtype=F64)), torch.ones(3, dtype=F64))
    opposite = torch.stack([g, -2 * g])  # the dual cone is g's orthogonal complement: both project to 0
    torch.testing.assert_close(_weights(opposite) @ opposite, torch.zeros(6, dtype=F64), atol=1e-8, rtol=0)
    for jac in (
        torch.stack([g, torch.zeros(6, dtype=F64), h]),
        torch.stack([1e6 * g, h]),
        g[None],
        reference.jacobian(2, 40, 50),
        reference.jacobian(3, 40, 10),
    ):
        update = _weights(jac) @ jac
        assert torch.isfinite(update).all()
        assert (jac @ update >= -1e-8 * float(jac.norm(dim=1).max()) ** 2).all()
    with pytest.raises(ValueError, match="non-finite"):
        _method(2)(torch.full((2, 2), float("inf")), torch.ones(2))
