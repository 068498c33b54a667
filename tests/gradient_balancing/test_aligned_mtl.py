"""Aligned-MTL: the aligned gradients B J are orthogonal with equal norms; weights w = B 1 from G alone.

Task permutation, the sum convention, degenerate inputs (every scale), state and the Balancer path:
tests/test_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing.aligned_mtl import AlignedMTL, balance_transformation
from tests import reference


def _weights(jacobian: torch.Tensor, **options: object) -> torch.Tensor:
    combination = reference.combine(reference.set_up(AlignedMTL(**options), jacobian.shape[0]), jacobian)  # type: ignore[arg-type]
    assert combination.weights is not None
    return combination.weights


def test_hand_computed_orthogonal_gradients() -> None:
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # G = diag(9, 1), B = 1 · diag(1/3, 1): aligned rows (1, 0) and (0, 1), w = (1/3, 1)
    weights = _weights(jacobian)
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1.0]))
    torch.testing.assert_close(weights @ jacobian, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(_weights(jacobian, scale="rmse") @ jacobian, torch.tensor([5**0.5, 5**0.5]))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(0, 6), st.sampled_from(["min", "median", "rmse"]))
def test_aligned_gradients_are_orthogonal_with_equal_norms(seed: int, k: int, extra: int, scale: str) -> None:
    jacobian = reference.jacobian(seed, k, k + extra)  # full row rank
    gram = jacobian @ jacobian.T
    aligned = balance_transformation(gram, scale) @ jacobian  # type: ignore[arg-type]
    eigenvalues = torch.linalg.eigvalsh(gram)
    sigma_sq = {"min": eigenvalues[0], "median": eigenvalues[(k - 1) // 2], "rmse": eigenvalues.mean()}[scale]
    # B = σ V Λ^-1/2 Vᵀ amplifies rounding by up to cond(G): a square random J can be ill-conditioned
    condition = float(eigenvalues[-1] / eigenvalues[0])
    atol = 1e-13 * condition * float(sigma_sq) + 1e-12
    torch.testing.assert_close(aligned @ aligned.T, sigma_sq * torch.eye(k, dtype=torch.float64), atol=atol, rtol=1e-7)
    torch.testing.assert_close(_weights(jacobian, scale=scale), balance_transformation(gram, scale).sum(dim=1))  # type: ignore[arg-type]


@given(st.integers(0, 2**31), st.integers(2, 6), st.integers(1, 5))
def test_rank_deficient_gradients_align_on_their_span(seed: int, p: int, surplus: int) -> None:
    jacobian = reference.jacobian(seed, p + surplus, p)  # K > P: rank P
    gram = jacobian @ jacobian.T
    aligned = balance_transformation(gram) @ jacobian
    eigenvalues, vectors = torch.linalg.eigh(gram)
    span = vectors[:, -p:]
    expected = eigenvalues[-p] * span @ span.T
    torch.testing.assert_close(aligned @ aligned.T, expected, atol=1e-8 * eigenvalues[-1], rtol=1e-6)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8), st.floats(1e-3, 1e3))
def test_scale_invariance_of_weights(seed: int, k: int, p: int, c: float) -> None:
    jacobian = reference.jacobian(seed, k, p)
    torch.testing.assert_close(_weights(c * jacobian), _weights(jacobian))


def test_rank_tolerance_follows_the_dtype() -> None:
    # eigenvalues 1 and 1e-10: resolved in float64, noise for float32 (tolerance λ_max · K · ε)
    jacobian64 = torch.tensor([[1.0, 0.0], [0.0, 1e-5]], dtype=torch.float64)
    torch.testing.assert_close(_weights(jacobian64) @ jacobian64, torch.tensor([1e-5, 1e-5], dtype=torch.float64))
    jacobian32 = jacobian64.float()
    torch.testing.assert_close(_weights(jacobian32), torch.tensor([1.0, 0.0]))


def test_zero_gradients_give_unit_weights() -> None:
    torch.testing.assert_close(_weights(torch.zeros(3, 4)), torch.ones(3))


def test_bad_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="scale"):
        AlignedMTL(scale="max")  # type: ignore[arg-type]
