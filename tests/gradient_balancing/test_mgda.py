"""MGDA: the min-norm point of the hull (KKT, brute force), its normalisations, equal and degenerate gradients.

Task permutation (every normalisation), the sum convention, dtypes, state and the Balancer path:
tests/test_contract.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing.mgda import MGDA
from tests import reference

F64 = torch.float64


def _method(k: int, **options: Any) -> MGDA:
    return reference.set_up(MGDA(**options), k)


def _weights(method: MGDA, jac: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    return reference.weights(method, jac, losses)


def test_hand_computed() -> None:
    jac = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    # min-norm point of the segment: w = (4/5, 1/5); sum convention ×2
    weights = _weights(_method(2), jac)
    torch.testing.assert_close(weights, torch.tensor([1.6, 0.4], dtype=F64))
    torch.testing.assert_close(weights @ jac, torch.tensor([1.6, 0.8], dtype=F64))


@given(st.integers(0, 2**31), st.integers(1, 4), st.integers(4, 10), st.sampled_from([0.0, 1.0, 4.0]))
def test_min_norm_kkt_and_brute_force(seed: int, k: int, p: int, shift: float) -> None:
    jac = reference.jacobian(seed, k, p, shift)
    gram = jac @ jac.T
    w = _weights(_method(k), jac) / k
    scale = float(gram.diagonal().max())
    gw = gram @ w
    value = float(w @ gw)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64))
    assert (gw >= value - 1e-9 * scale).all()
    assert (gw[w > 1e-9] - value).abs().max() <= 1e-9 * scale
    brute = reference.brute_min_norm(gram)
    assert value <= float(brute @ gram @ brute) + 1e-10 * scale
    # the update is a common descent direction: g_kᵀd ≥ ‖d‖²
    d = w @ jac
    assert (jac @ d >= d @ d - 1e-9 * scale).all()


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_equal_gradients_split_evenly(seed: int, k: int, p: int) -> None:
    jac = reference.jacobian(seed, 1, p).repeat(k, 1)
    # equal gradients: only the ridge makes the split even, and refining against the rank-one G leaves rounding
    # of about ε/δ (δ = 1e-8, the ridge) on each weight, up to ~3e-7 here (the update K·g: tests/test_contract.py)
    torch.testing.assert_close(_weights(_method(k), jac), torch.ones(k, dtype=F64), rtol=0, atol=1e-6)


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


def test_degenerate_inputs_with_zero_in_the_hull_give_no_update() -> None:
    g = reference.jacobian(0, 1, 6)[0]
    # a zero gradient or opposite ones put 0 in the hull: the update vanishes (finiteness: tests/test_contract.py)
    for jac in (
        torch.zeros(3, 6, dtype=F64),
        torch.stack([g, torch.zeros(6, dtype=F64), 2 * g]),
        torch.stack([g, -2 * g]),
    ):
        assert float((_weights(_method(jac.shape[0]), jac) @ jac).norm()) <= 1e-7 * float(jac.norm(dim=1).max())
    torch.testing.assert_close(_weights(_method(1), g[None]), torch.ones(1, dtype=F64))


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="normalization"):
        MGDA(normalization="norm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply_to"):
        MGDA(apply_to="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_norm"):
        MGDA(max_norm=0.0)
