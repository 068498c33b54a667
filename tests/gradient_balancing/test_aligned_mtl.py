"""Aligned-MTL: the aligned gradients B J are orthogonal with equal norms; weights w = B 1 from G alone."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.aligned_mtl import AlignedMTL, balance_transformation
from tests.models import DEGENERATE_JACOBIANS, TinyMTL, make_data, task_losses


def _weights(jacobian: torch.Tensor, **options: object) -> torch.Tensor:
    method = AlignedMTL(**options)  # type: ignore[arg-type]
    method.setup(jacobian.shape[0])
    weights: torch.Tensor | None = method(
        jacobian @ jacobian.T, torch.ones(jacobian.shape[0], dtype=jacobian.dtype)
    ).weights
    assert weights is not None
    return weights


def _jacobian(seed: int, k: int, p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_hand_computed_orthogonal_gradients() -> None:
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # G = diag(9, 1), B = 1 · diag(1/3, 1): aligned rows (1, 0) and (0, 1), w = (1/3, 1)
    weights = _weights(jacobian)
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1.0]))
    torch.testing.assert_close(weights @ jacobian, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(_weights(jacobian, scale="rmse") @ jacobian, torch.tensor([5**0.5, 5**0.5]))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(0, 6), st.sampled_from(["min", "median", "rmse"]))
def test_aligned_gradients_are_orthogonal_with_equal_norms(seed: int, k: int, extra: int, scale: str) -> None:
    jacobian = _jacobian(seed, k, k + extra)  # full row rank
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
    jacobian = _jacobian(seed, p + surplus, p)  # K > P: rank P
    gram = jacobian @ jacobian.T
    aligned = balance_transformation(gram) @ jacobian
    eigenvalues, vectors = torch.linalg.eigh(gram)
    span = vectors[:, -p:]
    expected = eigenvalues[-p] * span @ span.T
    torch.testing.assert_close(aligned @ aligned.T, expected, atol=1e-8 * eigenvalues[-1], rtol=1e-6)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8), st.floats(1e-3, 1e3))
def test_permutation_equivariance_and_scale_invariance_of_weights(seed: int, k: int, p: int, c: float) -> None:
    jacobian = _jacobian(seed, k, p)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    weights = _weights(jacobian)
    torch.testing.assert_close(_weights(jacobian[perm]), weights[perm])
    torch.testing.assert_close(_weights(c * jacobian), weights)


def test_sum_convention_for_equal_gradients() -> None:
    g = torch.randn(6, generator=torch.Generator().manual_seed(0))
    jacobian = g.expand(4, 6)
    torch.testing.assert_close(_weights(jacobian) @ jacobian, 4 * g)


def test_rank_tolerance_follows_the_dtype() -> None:
    # eigenvalues 1 and 1e-10: resolved in float64, noise for float32 (tolerance λ_max · K · ε)
    jacobian64 = torch.tensor([[1.0, 0.0], [0.0, 1e-5]], dtype=torch.float64)
    torch.testing.assert_close(_weights(jacobian64) @ jacobian64, torch.tensor([1e-5, 1e-5], dtype=torch.float64))
    jacobian32 = jacobian64.float()
    torch.testing.assert_close(_weights(jacobian32), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("jacobian", list(DEGENERATE_JACOBIANS.values()), ids=list(DEGENERATE_JACOBIANS))
@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_degenerate_inputs_give_finite_updates(jacobian: torch.Tensor, scale: str) -> None:
    weights = _weights(jacobian, scale=scale)
    assert weights.dtype == jacobian.dtype
    assert torch.isfinite(weights).all() and torch.isfinite(weights @ jacobian).all()


def test_zero_gradients_give_unit_weights() -> None:
    torch.testing.assert_close(_weights(torch.zeros(3, 4)), torch.ones(3))


def _flat_grad(output: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(output, params, retain_graph=True)])


def test_end_to_end_through_the_balancer() -> None:
    model, (x, y) = TinyMTL(), make_data()
    _, losses = task_losses(model, x, y)
    shared = list(model.encoder.parameters())
    jacobian = torch.stack([_flat_grad(losses[k], shared) for k in range(3)])
    weights = _weights(jacobian)
    result = tb.make("aligned_mtl", n_tasks=3).backward(losses, shared)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), weights @ jacobian)  # type: ignore[union-attr]
    assert result.gradient_weights is not None
    torch.testing.assert_close(result.gradient_weights, weights)


def test_bad_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="scale"):
        AlignedMTL(scale="max")  # type: ignore[arg-type]
