"""Squashing maps: actions in range, and log-densities against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Distribution, Normal, TransformedDistribution
from torch.distributions.transforms import AffineTransform, TanhTransform

from taskbalance.rl import SoftmaxSquash, TanhSquash


def _draw(k: int, seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, k, generator=gen, dtype=torch.float64)
    log_std = torch.rand(batch, k, generator=gen, dtype=torch.float64) * 2.5 - 1.5
    u = mean + log_std.exp() * torch.randn(batch, k, generator=gen, dtype=torch.float64)
    return u, mean, log_std


def _simplex_log_density_via_alr(
    u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, scale: float
) -> torch.Tensor:
    """Independent route: y_j = log(a_j / a_K) = u_j − u_K is Gaussian (full covariance, via Cholesky); change
    variables from y to a_1..a_{K−1} (|det ∂y/∂a| = s / Π a), then from the coordinate measure to the simplex
    surface measure (factor 1/√K)."""
    k = u.shape[-1]
    var = (2 * log_std).exp()
    cov = torch.diag_embed(var[:, :-1]) + var[:, -1:, None]  # Cov(u_j − u_K, u_i − u_K)
    y = u[:, :-1] - u[:, -1:]
    chol: torch.Tensor = torch.linalg.cholesky(cov)  # torch.linalg's stubs return Any
    white: torch.Tensor = torch.linalg.solve_triangular(
        chol, (y - (mean[:, :-1] - mean[:, -1:]))[..., None], upper=False
    )
    log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_p_y = -0.5 * white.squeeze(-1).pow(2).sum(-1) - 0.5 * log_det - 0.5 * (k - 1) * math.log(2 * math.pi)
    a = scale * torch.softmax(u, dim=-1)
    return log_p_y + math.log(scale) - a.log().sum(-1) - 0.5 * math.log(k)


@settings(max_examples=20)
@given(k=st.integers(2, 6), seed=st.integers(0, 2**31 - 1), scale_is_k=st.booleans())
def test_simplex_density_matches_additive_log_ratio_route(k: int, seed: int, scale_is_k: bool) -> None:
    u, mean, log_std = _draw(k, seed)
    scale = float(k) if scale_is_k else 1.0
    ours = SoftmaxSquash(scale).log_prob(u, mean, log_std)
    torch.testing.assert_close(ours, _simplex_log_density_via_alr(u, mean, log_std, scale))


def test_simplex_density_integrates_to_one_for_two_tasks() -> None:
    # a = (2σ(d), 2 − 2σ(d)) with d = u_1 − u_2; along the segment ds = √2 da_1 = √2 · 2σ(d)(1 − σ(d)) dd
    mean = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    log_std = torch.tensor([[-0.2, 0.5]], dtype=torch.float64)
    d = torch.linspace(-40, 40, 200_001, dtype=torch.float64)
    u = torch.stack([d, torch.zeros_like(d)], dim=-1)
    density = SoftmaxSquash(2.0).log_prob(u, mean.expand_as(u), log_std.expand_as(u)).exp()
    sig = torch.sigmoid(d)
    integral = torch.trapezoid(density * math.sqrt(2) * 2 * sig * (1 - sig), d)
    assert abs(float(integral) - 1.0) < 1e-6


@settings(max_examples=20)
@given(k=st.integers(2, 6), seed=st.integers(0, 2**31 - 1), shift=st.floats(-5, 5))
def test_simplex_density_is_a_density_of_the_weights(k: int, seed: int, shift: float) -> None:
    """u and u + c·1 give the same weights, hence the same density; permuting tasks permutes nothing else."""
    u, mean, log_std = _draw(k, seed)
    squash = SoftmaxSquash(float(k))
    base = squash.log_prob(u, mean, log_std)
    torch.testing.assert_close(squash.log_prob(u + shift, mean, log_std), base)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(squash.log_prob(u[:, perm], mean[:, perm], log_std[:, perm]), base)


def test_reference_density_is_gaussian_minus_tanh_correction() -> None:
    u, mean, log_std = _draw(3, 7)
    gaussian: Distribution = Normal(mean, log_std.exp())  # Distribution's log_prob is typed, Normal's is not
    expected = gaussian.log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2).sum(-1)
    torch.testing.assert_close(SoftmaxSquash(3.0, density="reference").log_prob(u, mean, log_std), expected)
    # not a density of the weights: it changes when u moves along 1 although the weights do not
    shifted = SoftmaxSquash(3.0, density="reference").log_prob(u + 1.0, mean, log_std)
    assert not torch.allclose(shifted, expected)


@settings(max_examples=20)
@given(k=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_softmax_weights_lie_in_the_open_simplex(k: int, seed: int) -> None:
    u, _, _ = _draw(k, seed)
    a = SoftmaxSquash(float(k))(u * 10)
    torch.testing.assert_close(a.sum(-1), torch.full((u.shape[0],), float(k), dtype=torch.float64))
    assert bool((a >= 0).all()) and bool((a <= k).all())


def test_tanh_density_matches_transformed_distribution() -> None:
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 3.0])
    u, mean, log_std = _draw(2, 3)
    squash = TanhSquash(low.tolist(), high.tolist()).double()
    a = squash(u)
    assert bool((a > low).all()) and bool((a < high).all())
    center, half = ((high + low) / 2).double(), ((high - low) / 2).double()
    dist: Distribution = TransformedDistribution(  # typed log_prob (TransformedDistribution's is not)
        Normal(mean, log_std.exp()), [TanhTransform(), AffineTransform(loc=center, scale=half)]
    )
    torch.testing.assert_close(squash.log_prob(u, mean, log_std), dist.log_prob(a).sum(-1))


def test_tanh_density_stays_finite_when_saturated() -> None:
    u = torch.tensor([[30.0], [-30.0]], dtype=torch.float64)
    value = TanhSquash(-1.0, 1.0).double().log_prob(u, torch.zeros_like(u), torch.zeros_like(u))
    assert bool(torch.isfinite(value).all())


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="low < high"):
        TanhSquash(1.0, -1.0)
    with pytest.raises(ValueError, match="same length"):
        TanhSquash([0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive finite"):
        SoftmaxSquash(0.0)
    with pytest.raises(ValueError, match="'simplex' or 'reference'"):
        SoftmaxSquash(2.0, density="tanh")  # type: ignore[arg-type]


@pytest.mark.parametrize("squash", [SoftmaxSquash(3.0), SoftmaxSquash(1.0, density="reference"), TanhSquash(-1.0, 3.0)])
def test_sample_is_the_squashed_draw_and_its_log_prob(squash: SoftmaxSquash | TanhSquash) -> None:
    """sample(μ, log σ, ε) = (f(u), log_prob(u, μ, log σ)) at u = μ + σε, values and gradients."""
    _, mean, log_std = _draw(3, seed=7, batch=6)
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mean.requires_grad_(True)
    log_std.requires_grad_(True)
    action, log_prob = squash.sample(mean, log_std, noise)
    u = mean + log_std.exp() * noise
    expected_action, expected_log_prob = squash(u), squash.log_prob(u, mean, log_std)
    torch.testing.assert_close(action, expected_action)
    torch.testing.assert_close(log_prob, expected_log_prob)
    weights = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)
    grads = torch.autograd.grad((log_prob * weights).sum() + action.pow(2).sum(), (mean, log_std))
    expected = torch.autograd.grad((expected_log_prob * weights).sum() + expected_action.pow(2).sum(), (mean, log_std))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)
