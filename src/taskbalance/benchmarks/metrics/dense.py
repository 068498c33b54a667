"""Losses and metrics for dense prediction (NYUv2, Cityscapes): segmentation, depth and surface normals.

All work on valid pixels only and stay on the device of their inputs:

- segmentation: label −1 is ignored. mIoU and pixel accuracy come from a confusion matrix C accumulated over the
  whole split: IoU_c = C_cc / (Σ_j C_cj + Σ_i C_ic − C_cc), mIoU = mean of IoU_c over the classes that occur in the
  labels or the predictions of the split, pixel accuracy = Σ_c C_cc / Σ C. Loss: cross-entropy on the logits.
- depth: a pixel is valid where the target depth is non-zero. abs_err = mean |d̂ − d|, rel_err = mean |d̂ − d| / d.
  Loss: L1 on valid pixels.
- normals: a pixel is valid where the target normal is non-zero. The angle error is θ = ∠(n̂, n) in degrees; we
  report its mean, median, and the percentages of pixels with θ < 11.25°, 22.5°, 30°. Loss: 1 − cos on valid pixels.

Reference: MTAN (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
arXiv 1803.10704), whose evaluation code Nash-MTL, CAGrad, FAMO and IGB reuse. Where we differ and why:

- The reference averages depth and normal errors per batch and then over batches, so a pixel's weight depends on
  the batch size and on how many valid pixels share its batch (the median is even a mean of per-batch medians).
  We average per pixel over the whole split (``reduction="pixel"``, the default): the number no longer depends on
  the evaluation batch size. ``reduction="batch"`` reproduces the reference's numbers for comparison with papers.
- The reference's mIoU is a plain mean over all classes, NaN when a class is absent from both the labels and the
  predictions of the split; we leave such classes out (no NaN on small splits).
- The reference marks a normal valid where its components *sum* to non-zero (a valid unit normal can sum to 0); we
  test the vector itself. The angle is atan2(‖n̂ × n‖, n̂·n), accurate near 0° where acos of a float32 cosine is not.
- With ``reduction="pixel"`` the median comes from a histogram of the angles (``bins_per_degree`` bins per degree,
  default 100: within 0.005° of the exact median) instead of keeping every pixel's error in memory (72 M
  floats on NYUv2's test split). Mean and threshold percentages are exact.

Percentages (mIoU, pixel accuracy, within-θ) are reported in % as in the papers' tables; errors in the data's units
(depth) and degrees (normals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Metric

Reduction = Literal["pixel", "batch"]
#: angle thresholds (degrees) of the normal metrics
ANGLE_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
IGNORE_INDEX = -1


def _check_reduction(reduction: str) -> None:
    if reduction not in ("pixel", "batch"):
        raise ValueError(f"reduction must be 'pixel' or 'batch', got {reduction!r}")


def depth_valid(target: Tensor) -> Tensor:
    """Valid-pixel mask of a depth target (N, 1, H, W): non-zero depth. Returns (N, 1, H, W) bool."""
    return target != 0


def normal_valid(target: Tensor) -> Tensor:
    """Valid-pixel mask of a normal target (N, 3, H, W): a non-zero vector. Returns (N, H, W) bool."""
    return (target != 0).any(dim=1)


# -- losses ----------------------------------------------------------------------------------------------------
def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits (N, C, H, W) against labels (N, H, W), label −1 ignored; mean over labelled pixels."""
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean |d̂ − d| over valid pixels (0 when a batch has none); pred and target (N, 1, H, W)."""
    mask = depth_valid(target)
    count = mask.sum().clamp_min(1)
    return ((pred - target).abs() * mask).sum() / count


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 − mean n̂·n over valid pixels (0 when a batch has none); pred (unit vectors) and target (N, 3, H, W)."""
    mask = normal_valid(target)
    count = mask.sum().clamp_min(1)
    return 1 - ((pred * target).sum(dim=1) * mask).sum() / count


def angle_error_deg(pred: Tensor, target: Tensor) -> Tensor:
    """Angle between the vectors of pred and target along dim 1, in degrees (same shape without dim 1)."""
    dot = (pred * target).sum(dim=1)
    cross = torch.linalg.cross(pred, target, dim=1).norm(dim=1)
    return torch.rad2deg(torch.atan2(cross, dot))


def _median(values: Tensor) -> Tensor:
    """Median of a 1-D tensor, the mean of the two middle values for an even count (as numpy's)."""
    n = values.numel()
    low = torch.kthvalue(values, (n + 1) // 2).values
    high = torch.kthvalue(values, n // 2 + 1).values
    return (low + high) / 2


# -- accumulators ----------------------------------------------------------------------------------------------
class SegmentationMetrics:
    """mIoU and pixel accuracy (in %) of a split from its confusion matrix; label −1 (and any label outside
    [0, n_classes)) is ignored. ``update(logits (N, C, H, W), labels (N, H, W))``."""

    def __init__(self, n_classes: int) -> None:
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.n_classes = n_classes
        self.confusion: Tensor | None = None

    def update(self, logits: Tensor, labels: Tensor) -> None:
        n = self.n_classes
        if logits.shape[1] != n:
            raise ValueError(f"expected logits with {n} classes in dim 1, got shape {tuple(logits.shape)}")
        pred = logits.detach().argmax(dim=1).flatten()
        target = labels.flatten().long()
        keep = (target >= 0) & (target < n)
        counts = torch.bincount(n * target[keep] + pred[keep], minlength=n * n).reshape(n, n)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def compute(self) -> dict[str, float]:
        if self.confusion is None:
            raise RuntimeError("SegmentationMetrics.compute() before any update()")
        conf = self.confusion.double()
        hits = conf.diagonal()
        union = conf.sum(dim=0) + conf.sum(dim=1) - hits
        present = union > 0
        miou = (hits[present] / union[present]).mean() if bool(present.any()) else conf.new_tensor(float("nan"))
        accuracy = hits.sum() / conf.sum()
        return {"miou": 100 * float(miou), "pix_acc": 100 * float(accuracy)}


class DepthMetrics:
    """Absolute and relative depth error on valid (non-zero target) pixels. ``update(pred, target)``, both
    (N, 1, H, W). ``reduction``: "pixel" (mean over every valid pixel of the split) or "batch" (the reference's
    mean of per-batch means; batches without a valid pixel are skipped). NaN when the split has no valid pixel."""

    def __init__(self, reduction: Reduction = "pixel") -> None:
        _check_reduction(reduction)
        self.reduction = reduction
        self.updates = 0
        self._sums: Tensor | None = None  # pixel: [Σ abs, Σ rel, pixels]; batch: [Σ batch abs, Σ batch rel, batches]

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.updates += 1
        mask = depth_valid(target)
        diff = (pred.detach() - target).abs()[mask]
        rel = diff / target[mask]
        row = torch.stack([diff.sum(), rel.sum(), diff.new_tensor(diff.numel())]).double()
        if self.reduction == "batch":
            # per-batch means; an empty batch adds a zero row (0/1 with count 0), so it is skipped
            row = torch.cat([row[:2] / row[2].clamp_min(1), (row[2:] > 0).double()])
        self._sums = row if self._sums is None else self._sums + row

    def compute(self) -> dict[str, float]:
        if self._sums is None:
            raise RuntimeError("DepthMetrics.compute() before any update()")
        total_abs, total_rel, count = self._sums.tolist()
        if count == 0:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": total_abs / count, "rel_err": total_rel / count}


class NormalMetrics:
    """Angle error (degrees) between predicted and target normals on valid pixels: mean, median, and % of pixels
    within 11.25°, 22.5° and 30°. ``update(pred, target)``, both (N, 3, H, W); predictions are normalised first.
    NaN when the split has no valid pixel.

    ``reduction="pixel"`` pools every valid pixel of the split; its median is read from a histogram with
    ``bins_per_degree`` bins per degree (the middle values are taken at their bin centres, so the median is within
    half a bin of the exact one). ``"batch"`` averages per-batch statistics (exact per-batch medians; batches
    without a valid pixel are skipped), as the reference does.
    """

    def __init__(self, reduction: Reduction = "pixel", bins_per_degree: int = 100) -> None:
        _check_reduction(reduction)
        if bins_per_degree < 1:
            raise ValueError(f"bins_per_degree must be >= 1, got {bins_per_degree}")
        self.reduction = reduction
        self.bins_per_degree = bins_per_degree
        self.updates = 0
        # pixel: [Σθ, n(θ<11.25), n(θ<22.5), n(θ<30), pixels]; batch: [Σ mean, Σ median, Σ 3 fractions, batches]
        self._sums: Tensor | None = None
        self._histogram: Tensor | None = None

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.updates += 1
        mask = normal_valid(target)
        angles = angle_error_deg(F.normalize(pred.detach(), dim=1), target)[mask].double()
        below = [(angles < t).sum().double() for t in ANGLE_THRESHOLDS]
        if self.reduction == "pixel":
            row = torch.stack([angles.sum(), *below, angles.new_tensor(angles.numel())])
            n_bins = 180 * self.bins_per_degree
            index = (angles * self.bins_per_degree).long().clamp_(0, n_bins - 1)
            histogram = torch.bincount(index, minlength=n_bins)
            self._histogram = histogram if self._histogram is None else self._histogram + histogram
        else:
            if angles.numel() == 0:
                return
            n = angles.numel()
            row = torch.stack([angles.mean(), _median(angles), *(b / n for b in below), angles.new_tensor(1.0)])
        self._sums = row if self._sums is None else self._sums + row

    def _histogram_median(self, count: int) -> float:
        assert self._histogram is not None
        cumulative = self._histogram.cumsum(0)
        ranks = cumulative.new_tensor([(count + 1) // 2, count // 2 + 1])  # the two middle values, 1-based
        bins = torch.searchsorted(cumulative, ranks)  # first bin holding at least that many values
        return float((bins.double() + 0.5).mean()) / self.bins_per_degree

    def compute(self) -> dict[str, float]:
        names = ["angle_mean", "angle_median", *(f"within_{t:g}" for t in ANGLE_THRESHOLDS)]
        if self.updates == 0:
            raise RuntimeError("NormalMetrics.compute() before any update()")
        if self._sums is None or self._sums[-1] == 0:
            return dict.fromkeys(names, math.nan)
        values = self._sums.tolist()
        count = values[-1]
        if self.reduction == "pixel":
            mean, median = values[0] / count, self._histogram_median(round(count))
            fractions = [v / count for v in values[1:4]]
        else:
            mean, median = values[0] / count, values[1] / count
            fractions = [v / count for v in values[2:5]]
        return dict(zip(names, [mean, median, *(100 * f for f in fractions)], strict=True))


#: the metrics of each dense task kind: (name, higher is better)
TASK_METRICS: dict[str, tuple[tuple[str, bool], ...]] = {
    "segmentation": (("miou", True), ("pix_acc", True)),
    "depth": (("abs_err", False), ("rel_err", False)),
    "normal": (
        ("angle_mean", False),
        ("angle_median", False),
        *((f"within_{t:g}", True) for t in ANGLE_THRESHOLDS),
    ),
}


def metrics_for(tasks: Sequence[str]) -> tuple[Metric, ...]:
    """The :class:`~.base.Metric` list of a benchmark whose tasks are dense task kinds, in task order."""
    return tuple(Metric(name, task, higher) for task in tasks for name, higher in TASK_METRICS[task])


class DenseEvaluator:
    """Every metric of a dense benchmark: ``update(outputs, targets)`` with one output and one target per task
    (kinds "segmentation", "depth", "normal", in ``tasks`` order); ``compute()`` merges their metrics."""

    def __init__(self, tasks: Sequence[str], n_classes: int, reduction: Reduction = "pixel") -> None:
        unknown = [t for t in tasks if t not in TASK_METRICS]
        if unknown:
            raise ValueError(f"unknown dense task kinds {unknown}; accepted: {', '.join(TASK_METRICS)}")
        self.tasks = tuple(tasks)
        self.parts: list[SegmentationMetrics | DepthMetrics | NormalMetrics] = [
            SegmentationMetrics(n_classes)
            if t == "segmentation"
            else DepthMetrics(reduction)
            if t == "depth"
            else NormalMetrics(reduction)
            for t in self.tasks
        ]

    def update(self, outputs: list[Tensor], targets: Any) -> None:
        if len(outputs) != len(self.tasks) or len(targets) != len(self.tasks):
            raise ValueError(f"expected {len(self.tasks)} outputs and targets, got {len(outputs)} and {len(targets)}")
        for part, output, target in zip(self.parts, outputs, targets, strict=True):
            part.update(output, target)

    def compute(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for part in self.parts:
            values.update(part.compute())
        return values
