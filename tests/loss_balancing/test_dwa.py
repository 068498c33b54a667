"""DWA: w = K · softmax(r / T), r the ratio of the last two epoch-mean losses; w = 1 for two epochs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from tests.reference import loss_epochs

positive = st.floats(min_value=1e-2, max_value=1e2)


def _run(method: tb.DWA, epochs: list[list[list[float]]]) -> list[torch.Tensor]:
    """Feed epochs of step losses; return the weights of the first step of every epoch and of the next one."""
    firsts = []
    for steps in epochs:
        firsts.append(method(torch.tensor(steps[0], dtype=torch.float64)).weights)
        for losses in steps[1:]:
            method(torch.tensor(losses, dtype=torch.float64))
        method.end_epoch()
    firsts.append(method(torch.ones(len(epochs[0][0]), dtype=torch.float64)).weights)
    return firsts


def test_hand_computed_weights() -> None:
    method = tb.DWA()
    method.setup(2)
    epochs = [[[1.0, 2.0], [1.0, 2.0]], [[0.2, 2.0], [0.8, 2.0]], [[0.5, 1.0], [0.5, 1.0]]]
    weights = _run(method, epochs)
    torch.testing.assert_close(weights[0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(weights[1], torch.ones(2, dtype=torch.float64))
    # epoch 2: r = (0.5, 1) -> 2 · softmax(r / 2)
    a, b = math.exp(0.25), math.exp(0.5)
    torch.testing.assert_close(weights[2], torch.tensor([2 * a / (a + b), 2 * b / (a + b)], dtype=torch.float64))
    # epoch 3: r = (0.5 / 0.5, 1 / 2) = (1, 0.5)
    torch.testing.assert_close(weights[3], torch.tensor([2 * b / (a + b), 2 * a / (a + b)], dtype=torch.float64))


def test_balanced_losses_and_log_variant() -> None:
    method = tb.DWA(temperature=1.0, log_losses=True)
    method.setup(2)
    assert method.takes_log and tb.make("dwa_si", n_tasks=2).loss.takes_log
    weights = _run(method, [[[1.0, 1.0]], [[1.0, 0.5]]])[-1]
    losses = torch.tensor([2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(method(losses).losses, weights * torch.log(losses))
    plain = tb.DWA()
    plain.setup(2)
    torch.testing.assert_close(plain(losses).losses, losses)


@given(loss_epochs(4, positive), st.data())
def test_invariant_to_loss_scaling(epochs: list[list[list[float]]], data: st.DataObject) -> None:
    """Per-task loss scales leave w unchanged, and w sums to K (task permutation: tests/test_contract.py)."""
    k = len(epochs[0][0])
    scale = data.draw(st.lists(positive, min_size=k, max_size=k))
    methods = []
    for _ in range(2):
        method = tb.DWA()
        method.setup(k)
        methods.append(method)
    reference = _run(methods[0], epochs)
    scaled = _run(
        methods[1], [[[v * c for v, c in zip(step, scale, strict=True)] for step in steps] for steps in epochs]
    )
    for w, ws in zip(reference, scaled, strict=True):
        torch.testing.assert_close(ws, w)
        torch.testing.assert_close(w.sum(), torch.tensor(float(k), dtype=torch.float64))


def test_errors_and_reset() -> None:
    with pytest.raises(ValueError, match="temperature"):
        tb.DWA(temperature=0.0)
    method = tb.DWA()
    method.setup(2)
    with pytest.raises(RuntimeError, match="no losses"):
        method.end_epoch()
    method(torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="positive epoch-mean"):
        method.end_epoch()
    method.reset()
    _run(method, [[[1.0, 1.0]], [[1.0, 0.5]]])
    assert not torch.equal(method(torch.ones(2)).weights, torch.ones(2))
    method.reset()
    torch.testing.assert_close(method(torch.ones(2)).weights, torch.ones(2))
