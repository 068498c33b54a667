"""MGDA: the min-norm point of the hull, its normalisations, the sum convention, state and the Balancer path."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.base import Combination
from taskbalance.gradient_balancing.mgda import MGDA
from tests.models import TinyMTL, make_data, task_losses

F64 = torch.float64


def _method(k: int, **options: Any) -> MGDA:
    method = MGDA(**options)
    method.setup(k)
    return method


def _jacobian(seed: int, k: int, p: int, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, p, generator=gen, dtype=F64) + shift * torch.randn(1, p, generator=gen, dtype=F64)


def _weights(method: MGDA, jac: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    k = jac.shape[0]
    combination: Combination = method(jac @ jac.T, torch.ones(k, dtype=jac.dtype) if losses is None else losses)
    assert combination.weights is not None and combination.converged
    return combination.weights


def _brute_min_norm(gram: torch.Tensor) -> float:
    k = gram.shape[0]
    best = float("inf")
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            a = torch.linalg.solve(gram[idx][:, idx], torch.ones(size, dtype=F64))
            if (a >= 0).all() and a.sum() > 0:
                w = torch.zeros(k, dtype=F64)
                w[idx] = a / a.sum()
                best = min(best, float(w @ gram @ w))
    return best


def test_hand_computed() -> None:
    jac = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    # min-norm point of the segment: w = (4/5, 1/5); sum convention ×2
    weights = _weights(_method(2), jac)
    torch.testing.assert_close(weights, torch.tensor([1.6, 0.4], dtype=F64))
    torch.testing.assert_close(weights @ jac, torch.tensor([1.6, 0.8], dtype=F64))


@given(st.integers(0, 2**31), st.integers(1, 4), st.integers(4, 10), st.sampled_from([0.0, 1.0, 4.0]))
def test_min_norm_kkt_and_brute_force(seed: int, k: int, p: int, shift: float) -> None:
    jac = _jacobian(seed, k, p, shift)
    gram = jac @ jac.T
    w = _weights(_method(k), jac) / k
    scale = float(gram.diagonal().max())
    gw = gram @ w
    value = float(w @ gw)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64))
    assert (gw >= value - 1e-9 * scale).all()
    assert (gw[w > 1e-9] - value).abs().max() <= 1e-9 * scale
    assert value <= _brute_min_norm(gram) + 1e-10 * scale
    # the update is a common descent direction: g_kᵀd ≥ ‖d‖²
    d = w @ jac
    assert (jac @ d >= d @ d - 1e-9 * scale).all()


@given(st.integers(0, 2**31), st.integers(2, 6), st.integers(1, 12))
def test_task_permutation_equivariance(seed: int, k: int, p: int) -> None:
    jac = _jacobian(seed, k, p, 1.0)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    losses = torch.rand(k, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) + 0.5
    for normalization in ("none", "l2", "loss", "loss+"):
        base = _weights(_method(k, normalization=normalization), jac, losses)
        permuted = _weights(_method(k, normalization=normalization), jac[perm], losses[perm])
        torch.testing.assert_close(permuted @ jac[perm], base @ jac, atol=1e-7 * float(jac.abs().max()), rtol=1e-7)


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_sum_convention(seed: int, k: int, p: int) -> None:
    g = _jacobian(seed, 1, p)
    jac = g.repeat(k, 1)
    weights = _weights(_method(k), jac)
    # equal gradients: only the ridge makes the split even, and refining against the rank-one G leaves rounding
    # of about ε/δ (δ = 1e-8, the ridge) on each weight, up to ~3e-7 here; the update itself is exact
    torch.testing.assert_close(weights, torch.ones(k, dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(weights @ jac, k * g[0])


def test_normalizations() -> None:
    jac = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 3.0]], dtype=F64)
    norms = jac.norm(dim=1)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=F64)
    unit = jac / norms[:, None]
    # "l2" solves on unit gradients and applies the weights to the raw ones
    torch.testing.assert_close(_weights(_method(3, normalization="l2"), jac), _weights(_method(3), unit))
    by_loss = _weights(_method(3), jac / losses[:, None])
    torch.testing.assert_close(_weights(_method(3, normalization="loss"), jac, losses), by_loss)
    both = _weights(_method(3), jac / (losses * norms)[:, None])
    torch.testing.assert_close(_weights(_method(3, normalization="loss+"), jac, losses), both)
    # LibMTL's variant: the same w on the normalised gradients
    normalized = _weights(_method(3, normalization="l2", apply_to="normalized"), jac)
    torch.testing.assert_close(normalized, _weights(_method(3), unit) / norms)
    with pytest.raises(ValueError, match="positive"):
        _method(3, normalization="loss")(jac @ jac.T, torch.tensor([0.5, -1.0, 2.0], dtype=F64))


def test_degenerate_inputs() -> None:
    g = _jacobian(0, 1, 6)[0]
    cases = {
        "zero": torch.zeros(3, 6, dtype=F64),
        "one zero": torch.stack([g, torch.zeros(6, dtype=F64), 2 * g]),
        "parallel": torch.stack([g, 3 * g]),
        "opposite": torch.stack([g, -2 * g]),
        "1e6 longer": torch.stack([1e6 * g, _jacobian(1, 1, 6)[0]]),
        "K=1": g[None],
        "K=40": _jacobian(2, 40, 30),
        "float32": _jacobian(3, 4, 6).float(),
    }
    for name, jac in cases.items():
        for normalization in ("none", "l2"):
            weights = _weights(_method(jac.shape[0], normalization=normalization), jac)
            assert weights.dtype == jac.dtype, name
            assert torch.isfinite(weights).all(), name
    # a zero gradient or opposite ones put 0 in the hull: the update vanishes
    for name in ("zero", "one zero", "opposite"):
        jac = cases[name]
        assert float((_weights(_method(jac.shape[0]), jac) @ jac).norm()) <= 1e-7 * float(jac.norm(dim=1).max())
    torch.testing.assert_close(_weights(_method(1), cases["K=1"]), torch.ones(1, dtype=F64))


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="normalization"):
        MGDA(normalization="norm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply_to"):
        MGDA(apply_to="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_norm"):
        MGDA(max_norm=0.0)


def test_state_round_trip_keeps_the_warm_start() -> None:
    method = _method(4)
    jac = _jacobian(5, 4, 9, 1.0)
    method(jac @ jac.T, torch.ones(4, dtype=F64))
    fresh = _method(4)
    fresh.load_state_dict(method.state_dict())
    nxt = _jacobian(6, 4, 9, 1.0)
    a = method(nxt @ nxt.T, torch.ones(4, dtype=F64)).weights
    b = fresh(nxt @ nxt.T, torch.ones(4, dtype=F64)).weights
    assert a is not None and b is not None
    assert torch.equal(a, b)
    method.reset()
    assert method.state_dict()["_extra_state"]["warm"] is None


def test_through_the_balancer_matches_the_weights_on_the_jacobian() -> None:
    model = TinyMTL()
    x, y = make_data()
    shared = list(model.encoder.parameters())
    _, losses = task_losses(model, x, y)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    jac = torch.stack(rows)
    expected_w = _weights(_method(3), jac.double()).float()
    balancer = tb.make("mgda", n_tasks=3, engine="loop")
    result = balancer.backward(losses, shared)
    assert result.gradient_weights is not None
    torch.testing.assert_close(result.gradient_weights, expected_w, rtol=1e-5, atol=1e-6)
    update = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    torch.testing.assert_close(update, expected_w @ jac, rtol=1e-5, atol=1e-6)
