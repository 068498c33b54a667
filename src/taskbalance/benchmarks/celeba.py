"""CelebA: 40 binary face attributes as 40 tasks, from the official aligned-and-cropped release at a user path.

Data: :mod:`taskbalance.benchmarks.datasets.celeba`; model: :class:`~.models.resnet.CelebAResNet`. Loss: binary
cross-entropy per attribute. Metric: per-attribute accuracy (higher is better) on the official val / test
partitions; :func:`mean_error` gives the papers' summary 1 − mean accuracy.

Deliberate differences: Sener & Koltun's loader subtracts a mean colour before resizing and FAMO's uses none; we use
none (BatchNorm follows the first convolution). FAMO reports F1 with a 9-layer plain CNN; we report accuracy, the
metric of Sener & Koltun and of most CelebA MTL tables, with their ResNet trunk, and keep FAMO's training schedule
(Adam 3e-4, batch 256, 15 epochs) as the ``paper`` protocol. The ``quick`` protocol is REDUCED (a subset, 32×32,
width 8, 2 epochs) because the Δm baselines alone are 40 single-task runs; it checks a pipeline, it does not
reproduce a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import Benchmark, Metric, Split, TrainingProtocol
from .batches import TensorBatches
from .datasets.celeba import ATTR_FILE, ATTRIBUTES, PARTITION_FILE, load_celeba
from .datasets.mnist import DataSourceError
from .models.resnet import CelebAResNet


def attribute_losses(outputs: list[Tensor], targets: Tensor) -> Tensor:
    """(K,) mean binary cross-entropy of each attribute's logits (N,) against targets (N, K) in {0, 1}."""
    logits = torch.stack(outputs, dim=1)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").mean(dim=0)


class CelebAEvaluator:
    """Counts correct predictions (logit > 0 ⇔ attribute present) per attribute on the device; accuracy in [0, 1]."""

    def __init__(self, attributes: Sequence[str] = ATTRIBUTES) -> None:
        self.attributes = tuple(attributes)
        self.correct: Tensor | None = None
        self.count = 0

    def update(self, outputs: list[Tensor], targets: Tensor) -> None:
        predicted = torch.stack(outputs, dim=1).detach() > 0
        hits = (predicted == (targets > 0.5)).sum(dim=0)
        self.correct = hits if self.correct is None else self.correct + hits
        self.count += int(targets.shape[0])

    def compute(self) -> dict[str, float]:
        if self.correct is None or self.count == 0:
            raise RuntimeError("CelebAEvaluator.compute() before any update()")
        accuracy = (self.correct.double() / self.count).tolist()  # one transfer per evaluation, not per batch
        return {f"acc/{name}": float(value) for name, value in zip(self.attributes, accuracy, strict=True)}


def mean_error(metrics: dict[str, float]) -> float:
    """The papers' CelebA summary: 1 − the mean of the per-attribute accuracies in ``metrics``."""
    accuracies = [value for name, value in metrics.items() if name.startswith("acc/")]
    if not accuracies:
        raise ValueError("metrics holds no 'acc/<attribute>' entries")
    return 1.0 - sum(accuracies) / len(accuracies)


_PAPER = TrainingProtocol(
    name="paper", epochs=15, batch_size=256, lr=3e-4, image_size=64, width=64,
    description="official splits, 64×64 inputs, ResNet-18 trunk, Adam 3e-4, batch 256, 15 epochs (FAMO's schedule)",
)  # fmt: skip


# -- the benchmark -------------------------------------------------------------------------------------------------
class CelebABenchmark(Benchmark):
    """CelebA's 40 attributes with a ResNet-18-style trunk (see the module docstring); needs ``data_dir``."""

    name: ClassVar[str] = "celeba"
    tasks: ClassVar[tuple[str, ...]] = ATTRIBUTES
    metrics: ClassVar[tuple[Metric, ...]] = tuple(Metric(f"acc/{a}", a, higher_is_better=True) for a in ATTRIBUTES)
    protocols: ClassVar[dict[str, TrainingProtocol]] = {
        "paper": _PAPER,
        "quick": _PAPER.reduced_to(
            "quick",
            "first 1,024 training and 256 val / test images, 32×32 inputs, ResNet-18 trunk at width 8, Adam 1e-3, "
            "batch 64, 2 epochs (a smoke-scale run: ~0.3 s per EW step on one CPU core)",
            epochs=2,
            batch_size=64,
            lr=1e-3,
            train_size=1024,
            eval_size=256,
            image_size=32,
            width=8,
        ),
    }
    default_protocol: ClassVar[str] = "paper"

    def __init__(self, protocol: str | None = None, data_dir: str | None = None, cache: bool = True) -> None:
        super().__init__(protocol, data_dir)
        if data_dir is None:
            raise DataSourceError(
                "CelebA cannot be installed here: download the aligned-and-cropped release (img_align_celeba, "
                f"{ATTR_FILE}, {PARTITION_FILE}) from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and pass "
                "its folder as data_dir"
            )
        if self.protocol.image_size is None:
            raise ValueError(f"CelebA protocol {self.protocol.name!r} must set image_size")
        self.root = data_dir
        self.image_size: int = self.protocol.image_size
        self.cache = cache
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}

    def split(self, split: Split) -> tuple[Tensor, Tensor]:
        """(images (N, 3, S, S) uint8, labels (N, 40) float32) of ``split``, loaded once."""
        if split not in self._splits:
            limit = self.protocol.train_size if split == "train" else self.protocol.eval_size
            data = load_celeba(self.root, split, self.image_size, limit=limit, cache=self.cache)
            images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
            self._splits[split] = images, torch.from_numpy(data.labels).float()
        return self._splits[split]

    def loader(self, split: Split, *, batch_size: int, shuffle: bool, generator: torch.Generator) -> TensorBatches:
        images, labels = self.split(split)
        return TensorBatches(images, labels, batch_size, shuffle, generator)

    def model(self) -> CelebAResNet:
        return CelebAResNet(n_tasks=len(ATTRIBUTES), width=self.protocol.width)

    def losses(self, outputs: list[Tensor], targets: Tensor) -> Tensor:
        return attribute_losses(outputs, targets)

    def evaluator(self) -> CelebAEvaluator:
        return CelebAEvaluator()

    def to_device(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        """uint8 images travel as bytes and become float32 in [0, 1] on ``device``."""
        images, labels = batch
        return images.to(device).float().div_(255.0), labels.to(device)
