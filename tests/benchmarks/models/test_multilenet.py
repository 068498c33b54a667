"""MultiLeNet: the reference layer sizes and the encoder/heads split the Balancer relies on."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import taskbalance as tb
from taskbalance.benchmarks.models.multilenet import MultiLeNet


def _batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n, 2), generator=gen)


def test_shapes_and_reference_layer_sizes() -> None:
    model = MultiLeNet(n_tasks=3, n_classes=7)
    x, _ = _batch()
    features, logits = model(x)
    assert features.shape == (6, 50)
    assert [tuple(out.shape) for out in logits] == [(6, 7)] * 3
    conv = (1 * 25 + 1) * 10 + (10 * 25 + 1) * 20
    assert sum(p.numel() for p in model.encoder.parameters()) == conv + 320 * 50 + 50
    assert [sum(p.numel() for p in head.parameters()) for head in model.heads] == [50 * 50 + 50 + 50 * 7 + 7] * 3


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = MultiLeNet()
    x, _ = _batch()
    model.eval()
    first, second = model(x)[0], model(x)[0]
    torch.testing.assert_close(first, second)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    deterministic = MultiLeNet(dropout=0.0).train()
    torch.testing.assert_close(deterministic(x)[0], deterministic(x)[0])


@pytest.mark.parametrize(("option", "value"), [("dropout", 1.0), ("dropout", -0.1), ("n_tasks", 0), ("n_classes", 1)])
def test_bad_options(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        MultiLeNet(**{option: value})  # type: ignore[arg-type]


def _losses(model: MultiLeNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features, logits = model(x)
    return features, torch.stack([F.cross_entropy(out, y[:, k]) for k, out in enumerate(logits)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encoder_heads_split_works_with_the_balancer(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    model = MultiLeNet(dropout=0.0).to(dtype)
    x, y = _batch(8)
    x = x.to(dtype)
    _, losses = _losses(model, x, y)
    torch.autograd.backward(losses.sum())
    expected = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    features, losses = _losses(model, x, y)
    result = tb.make("ew", n_tasks=2).backward(losses, shared_params=model.encoder.parameters(), features=features)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(result.weights, torch.ones(2, dtype=dtype))


def test_encoder_and_heads_partition_the_parameters() -> None:
    model = MultiLeNet()
    encoder = {id(p) for p in model.encoder.parameters()}
    heads = {id(p) for p in model.heads.parameters()}
    assert not encoder & heads
    assert encoder | heads == {id(p) for p in model.parameters()}


class _UnitWeights(tb.GradientBalancer):
    """w = 1 from the Gramian: the gradient-method path must then reproduce an ordinary backward."""

    needs = "gramian"

    def combine(self, matrix: torch.Tensor, losses: torch.Tensor) -> tb.Combination:
        return tb.Combination(weights=torch.ones_like(losses))


def test_gradient_method_path_through_the_split() -> None:
    torch.manual_seed(2)
    model = MultiLeNet(dropout=0.0)
    x, y = _batch(8)
    _, losses = _losses(model, x, y)
    torch.autograd.backward(losses.sum())
    expected = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    features, losses = _losses(model, x, y)
    balancer = tb.Balancer(gradient=_UnitWeights(), n_tasks=2)
    balancer.backward(losses, shared_params=model.encoder.parameters(), features=features)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g)
