"""Headline compositions train the example model (MultiLeNet) on MultiMNIST-format fixture data.

The issue's acceptance: ``igbv1+nashmtl``, ``igbv2+cagrad``, ``dbmtl`` and ``imgrad`` each reach a lower
validation loss than at the start. Data: glyph digits (label visible in the pixels) composed by the real
MultiMNIST construction, so the tasks are learnable in a few dozen steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import taskbalance as tb
from taskbalance.benchmarks import Digits, MultiLeNet
from taskbalance.benchmarks.datasets.multimnist import construct
from tests.benchmarks.fixtures import glyph_images


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    digits = Digits(glyph_images(labels), labels)
    images, targets, _ = construct(digits, digits, rng)
    x = torch.from_numpy(images).float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)
    return x, torch.from_numpy(targets)


def _losses(model: MultiLeNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features, logits = model(x)
    return features, torch.stack([F.cross_entropy(out, y[:, k]) for k, out in enumerate(logits)])


@pytest.mark.parametrize("spec", ["igbv1+nashmtl", "igbv2+cagrad", "dbmtl", "imgrad"])
def test_composition_lowers_validation_loss(spec: str) -> None:
    torch.manual_seed(0)
    model = MultiLeNet(dropout=0.0)
    balancer = tb.make(spec, n_tasks=2)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=3e-3)
    x_train, y_train = _data(96, seed=1)
    x_val, y_val = _data(64, seed=2)
    with torch.no_grad():
        before = _losses(model, x_val, y_val)[1]
    for _epoch in range(6):
        for batch in torch.split(torch.arange(96), 24):
            features, losses = _losses(model, x_train[batch], y_train[batch])
            result = balancer.backward(losses, model.encoder.parameters(), features=features)
            assert torch.isfinite(result.weights).all()
            optimizer.step()
            optimizer.zero_grad()
        balancer.end_epoch()
    with torch.no_grad():
        after = _losses(model, x_val, y_val)[1]
    assert (after < before).all(), f"{spec}: validation losses {before.tolist()} -> {after.tolist()}"
