"""Dense-prediction losses and metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.benchmarks.metrics.dense import (
    DenseEvaluator,
    DepthMetrics,
    NormalMetrics,
    SegmentationMetrics,
    depth_loss,
    metrics_for,
    normal_loss,
    segmentation_loss,
)


def one_hot_logits(pred: list[int], n_classes: int) -> torch.Tensor:
    """Logits (1, C, 1, W) whose argmax is ``pred``."""
    return F.one_hot(torch.tensor(pred), n_classes).T.float()[None, :, None, :]


def test_miou_ignores_unlabelled_pixels_and_absent_classes() -> None:
    # labels 0 0 1 −1, predictions 0 1 1 2: class 0 IoU 1/2, class 1 IoU 1/2; class 2 is only predicted on the
    # ignored pixel and class 3 never occurs: both are left out of the mean
    metric = SegmentationMetrics(4)
    metric.update(one_hot_logits([0, 1, 1, 2], 4), torch.tensor([[[0, 0, 1, -1]]]))
    values = metric.compute()
    assert values["miou"] == pytest.approx(50.0)
    assert values["pix_acc"] == pytest.approx(200 / 3)


def test_miou_counts_a_class_that_is_predicted_but_absent_from_the_labels() -> None:
    # labels 0 0, predictions 0 1: class 0 IoU 1/2, class 1 IoU 0/1 → mIoU 25 %
    metric = SegmentationMetrics(3)
    metric.update(one_hot_logits([0, 1], 3), torch.tensor([[[0, 0]]]))
    assert metric.compute()["miou"] == pytest.approx(25.0)


def test_confusion_accumulates_over_batches() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 5, 6, 7), torch.randint(-1, 5, (4, 6, 7))
    whole, parts = SegmentationMetrics(5), SegmentationMetrics(5)
    whole.update(logits, labels)
    for i in range(4):
        parts.update(logits[i : i + 1], labels[i : i + 1])
    assert whole.confusion is not None and parts.confusion is not None
    assert torch.equal(whole.confusion, parts.confusion)


def test_depth_errors_on_valid_pixels() -> None:
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    target = torch.tensor([2.0, 0.0, 2.0, 5.0]).view(1, 1, 1, 4)  # pixel 1 has no depth
    metric = DepthMetrics()
    metric.update(pred, target)
    values = metric.compute()
    assert values["abs_err"] == pytest.approx(1.0)  # (1 + 1 + 1) / 3
    assert values["rel_err"] == pytest.approx((0.5 + 0.5 + 0.2) / 3)
    assert depth_loss(pred, target).item() == pytest.approx(1.0)


def test_depth_pixel_and_batch_reductions_differ_as_computed_by_hand() -> None:
    # batch 1: one valid pixel with error 4; batch 2: three valid pixels with error 1
    batches = [
        (torch.tensor([5.0, 9.0]).view(1, 1, 1, 2), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)),
        (torch.tensor([2.0, 2.0, 2.0]).view(1, 1, 1, 3), torch.tensor([1.0, 1.0, 1.0]).view(1, 1, 1, 3)),
    ]
    pixel, batch = DepthMetrics("pixel"), DepthMetrics("batch")
    for pred, target in batches:
        pixel.update(pred, target)
        batch.update(pred, target)
    assert pixel.compute()["abs_err"] == pytest.approx((4 + 3) / 4)
    assert batch.compute()["abs_err"] == pytest.approx((4 + 1) / 2)
    assert pixel.compute()["rel_err"] == pytest.approx((4 + 3) / 4)


def test_depth_batch_reduction_skips_batches_without_valid_pixels() -> None:
    metric = DepthMetrics("batch")
    metric.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert math.isnan(metric.compute()["abs_err"])
    metric.update(torch.full((1, 1, 1, 1), 3.0), torch.ones(1, 1, 1, 1))
    assert metric.compute()["abs_err"] == pytest.approx(2.0)


def angle_batch(degrees: list[float], length: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions at the given angles from the target (0, 0, 1) in the x-z plane (not unit length), plus one
    pixel whose target is missing."""
    theta = torch.deg2rad(torch.tensor([*degrees, 0.0], dtype=torch.float64))
    pred = length * torch.stack([theta.sin(), torch.zeros_like(theta), theta.cos()])[None, :, None, :]
    target = torch.zeros_like(pred)
    target[:, 2, :, :-1] = 1.0
    return pred, target


def test_normal_angle_errors_at_known_angles() -> None:
    pred, target = angle_batch([0.0, 10.0, 20.0, 45.0, 90.0])
    for reduction in ("pixel", "batch"):
        metric = NormalMetrics(reduction)  # type: ignore[arg-type]
        metric.update(pred, target)
        values = metric.compute()
        assert values["angle_mean"] == pytest.approx(33.0, abs=1e-9)
        assert values["angle_median"] == pytest.approx(20.0, abs=0.005)
        assert values["within_11.25"] == pytest.approx(40.0)
        assert values["within_22.5"] == pytest.approx(60.0)
        assert values["within_30"] == pytest.approx(60.0)


def test_normal_median_of_an_even_count_averages_the_middle_values() -> None:
    pred, target = angle_batch([10.0, 20.0, 40.0, 80.0])
    metric = NormalMetrics(bins_per_degree=1000)
    metric.update(pred, target)
    assert metric.compute()["angle_median"] == pytest.approx(30.0, abs=5e-4)


def test_normal_loss_is_one_minus_mean_cosine_on_valid_pixels() -> None:
    pred, target = angle_batch([0.0, 60.0], length=1.0)
    assert normal_loss(pred, target).item() == pytest.approx(1 - (1 + 0.5) / 2)


def test_segmentation_loss_ignores_unlabelled_pixels() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 1, 4)
    labels = torch.tensor([[[0, 2, -1, 1]]])
    expected = F.cross_entropy(logits[0, :, 0, [0, 1, 3]].T, labels[0, 0, [0, 1, 3]])
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item())


@given(st.integers(1, 5), st.integers(0, 1000))
def test_pixel_reduction_does_not_depend_on_the_batching(n_batches: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(6, 3, 4, 5, generator=generator, dtype=torch.float64)
    target = F.normalize(torch.randn(6, 3, 4, 5, generator=generator, dtype=torch.float64), dim=1)
    target[:, :, 0] = 0
    depth_pred, depth_target = pred[:, :1].abs(), target[:, 1:2].abs()
    whole_n, whole_d = NormalMetrics(), DepthMetrics()
    whole_n.update(pred, target)
    whole_d.update(depth_pred, depth_target)
    split_n, split_d = NormalMetrics(), DepthMetrics()
    for chunk in torch.arange(6).chunk(n_batches):
        split_n.update(pred[chunk], target[chunk])
        split_d.update(depth_pred[chunk], depth_target[chunk])
    assert split_n.compute() == pytest.approx(whole_n.compute())
    assert split_d.compute() == pytest.approx(whole_d.compute())


def test_evaluator_reports_every_metric_with_directions() -> None:
    tasks = ("segmentation", "depth", "normal")
    metrics = metrics_for(tasks)
    directions = {m.name: m.higher_is_better for m in metrics}
    assert directions == {
        "miou": True,
        "pix_acc": True,
        "abs_err": False,
        "rel_err": False,
        "angle_mean": False,
        "angle_median": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }
    evaluator = DenseEvaluator(tasks, n_classes=3)
    torch.manual_seed(2)
    outputs = [torch.randn(2, 3, 4, 4), torch.rand(2, 1, 4, 4), F.normalize(torch.randn(2, 3, 4, 4), dim=1)]
    targets = (
        torch.randint(-1, 3, (2, 4, 4)),
        torch.rand(2, 1, 4, 4) + 0.1,
        F.normalize(torch.randn(2, 3, 4, 4), dim=1),
    )
    evaluator.update(outputs, targets)
    assert set(evaluator.compute()) == set(directions)


def test_bad_options_fail_early() -> None:
    with pytest.raises(ValueError, match="reduction"):
        DepthMetrics("mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_classes"):
        SegmentationMetrics(1)
    with pytest.raises(ValueError, match="dense task kinds"):
        DenseEvaluator(("segmentation", "edges"), n_classes=3)
    with pytest.raises(RuntimeError, match="before any update"):
        NormalMetrics().compute()
