"""STCH: warm-up on Σ log L, then ℓ̃ whose sum has the gradient of K μ logsumexp(w (f − z) / μ)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb

positive = st.floats(min_value=1e-2, max_value=1e2)


def _warm(method: tb.STCH, baseline: list[float], epochs: int) -> None:
    """Run ``epochs`` epochs of two steps whose mean raw loss is ``baseline``."""
    for _ in range(epochs):
        for factor in (0.5, 1.5):
            method(torch.tensor(baseline, dtype=torch.float64) * factor)
        method.end_epoch()


def test_warmup_then_hand_computed_weights() -> None:
    method = tb.STCH(warmup_epochs=2)
    method.setup(2)
    losses = torch.tensor([2.0, 8.0], dtype=torch.float64)
    for _ in range(2):
        out = method(losses)
        torch.testing.assert_close(out.losses, torch.log(losses))
        torch.testing.assert_close(out.weights, torch.ones(2, dtype=torch.float64))
        method(losses * 3)  # epoch 1 (the last warm-up epoch) has mean 2 · losses
        method.end_epoch()
    out = method(torch.tensor([4.0, 4.0], dtype=torch.float64))
    # f = log(L / L̄) = (0, log 1/4); p = softmax(f) = (4/5, 1/5); weights = K p = (8/5, 2/5)
    torch.testing.assert_close(out.weights, torch.tensor([1.6, 0.4], dtype=torch.float64))
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 0.4 * math.log(0.25)], dtype=torch.float64))


@given(
    st.lists(st.tuples(positive, positive, st.floats(0.2, 5.0), st.floats(-1.0, 1.0)), min_size=1, max_size=5),
    st.floats(0.05, 10.0),
    st.booleans(),
    st.booleans(),
)
def test_gradient_is_exact(
    rows: list[tuple[float, float, float, float]], mu: float, normalise: bool, use_log: bool
) -> None:
    k = len(rows)
    base = [r[0] for r in rows]
    current = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    preference = [r[2] for r in rows]
    ideal = [r[3] for r in rows]
    method = tb.STCH(
        mu=mu, warmup_epochs=1, normalise=normalise, log_losses=use_log, preference=preference, ideal=ideal
    )
    method.setup(k)
    _warm(method, base, 1)
    x = current.clone().requires_grad_()
    out = method(x)
    (ours,) = torch.autograd.grad(out.losses.sum(), x)
    y = current.clone().requires_grad_()
    scaled = y / torch.tensor(base, dtype=torch.float64) if normalise else y
    f = torch.log(scaled) if use_log else scaled
    w = torch.tensor(preference, dtype=torch.float64)
    objective = k * mu * torch.logsumexp(w * (f - torch.tensor(ideal, dtype=torch.float64)) / mu, dim=0)
    (direct,) = torch.autograd.grad(objective, y)
    torch.testing.assert_close(ours, direct)


@given(st.lists(st.tuples(positive, positive, positive), min_size=1, max_size=5))
def test_normalised_weights_invariant_to_scaling(rows: list[tuple[float, float, float]]) -> None:
    """Per-task loss scales leave w unchanged, and w sums to K (task permutation: tests/test_contract.py)."""
    k = len(rows)
    base = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    current = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    scale = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    weights = []
    for b, c in ((base, current), (base * scale, current * scale)):
        method = tb.STCH()
        method.setup(k)
        _warm(method, b.tolist(), 5)
        weights.append(method(c).weights)
    torch.testing.assert_close(weights[1], weights[0])
    torch.testing.assert_close(weights[0].sum(), torch.tensor(float(k), dtype=torch.float64))


def test_small_mu_approaches_the_max_and_plain_losses() -> None:
    method = tb.STCH(mu=1e-3, warmup_epochs=0, normalise=False, log_losses=False)
    method.setup(3)
    assert not method.takes_log
    losses = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    out = method(losses)
    torch.testing.assert_close(out.weights, torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.losses, out.weights * losses)


def test_options_and_reset() -> None:
    with pytest.raises(ValueError, match="warmup_epochs >= 1"):
        tb.STCH(warmup_epochs=0)
    for bad in ({"mu": 0.0}, {"warmup_epochs": -1}, {"preference": [1.0, 0.0]}, {"ideal": [float("nan")]}):
        with pytest.raises(ValueError):
            tb.STCH(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 preference values for 3 tasks"):
        tb.make("stch", n_tasks=3, preference=[1.0, 2.0])
    method = tb.STCH(warmup_epochs=1)
    method.setup(2)
    _warm(method, [1.0, 2.0], 1)
    assert not torch.equal(method(torch.tensor([3.0, 1.0])).weights, torch.ones(2))
    method.reset()
    torch.testing.assert_close(method(torch.tensor([3.0, 1.0])).weights, torch.ones(2))
