"""SegNet split and MTAN: shapes, parameter counts, and the encoder/heads split the Balancer relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.benchmarks.models.segnet import SegNetMTAN, SegNetSplit

CHANNELS = (5, 1, 3)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("model_class", [SegNetSplit, SegNetMTAN])
def test_output_shapes_and_unit_normals(model_class: type[SegNetSplit | SegNetMTAN]) -> None:
    torch.manual_seed(0)
    model = model_class(CHANNELS, width=4)
    features, outputs = model(torch.randn(2, 3, 32, 64))
    assert [tuple(o.shape) for o in outputs] == [(2, 5, 32, 64), (2, 1, 32, 64), (2, 3, 32, 64)]
    torch.testing.assert_close(outputs[2].norm(dim=1), torch.ones(2, 32, 64))
    if model_class is SegNetSplit:
        assert features is not None and tuple(features.shape) == (2, 4, 32, 64)
    else:
        assert features is None


def test_parameter_counts_match_the_reference() -> None:
    # the MTAN code's single-task size (trunk + 13-class head) is 24,981,069; its models have 3 more parameters
    # (UW's log-variances) than ours
    assert count(SegNetSplit((13,))) == 24_981_069
    assert count(SegNetSplit((13, 1, 3))) == 25_055_185
    assert count(SegNetMTAN((13, 1, 3))) == 44_229_073


def test_sizes_must_be_multiples_of_32() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        SegNetSplit(CHANNELS, width=2)(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="width"):
        SegNetSplit(CHANNELS, width=0)
    with pytest.raises(ValueError, match="task_channels"):
        SegNetMTAN([], width=2)


def losses_of(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(o - 0.3).square().mean() + 0.1 for o in outputs])


@pytest.mark.parametrize("model_class", [SegNetSplit, SegNetMTAN])
def test_balancer_gives_each_head_its_own_gradient_and_the_encoder_the_sum(
    model_class: type[SegNetSplit | SegNetMTAN],
) -> None:
    torch.manual_seed(1)
    model = model_class(CHANNELS, width=2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    features, outputs = model(x)
    balancer = tb.make("ew", n_tasks=3)
    balancer.backward(losses_of(outputs), shared_params=model.encoder.parameters(), features=features)
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert set(got) == {name for name, _ in model.named_parameters()}

    model.zero_grad()
    torch.autograd.backward(losses_of(model(x)[1]).sum())
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(got[name], p.grad, msg=name)

    model.zero_grad()
    torch.autograd.backward(losses_of(model(x)[1][:1]).sum())  # head 0 depends on task 0 alone
    for p in model.heads[0].parameters():
        assert p.grad is not None
    for head in model.heads[1:]:
        assert all(p.grad is None for p in head.parameters())
