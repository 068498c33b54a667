"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST) as runner benchmarks: two classification tasks.

Data: :func:`taskbalance.benchmarks.datasets.multimnist.load_multimnist` (Sener & Koltun's construction), pairing seed 0
for every run seed (the data is fixed; seeds vary the initialisation and the batch order), 10,000 training images
held out for validation: 50,000 train / 10,000 val / 10,000 test. Model: :class:`MultiLeNet` (dropout 0.5), one
cross-entropy loss per task. Metrics: the test accuracy (%) of each task, higher is better; Δm% averages over
these two, as the MultiMNIST papers do (the cross-entropies are reported per epoch as training losses only).

Protocols:

- ``paper``: Sener & Koltun's training script (arXiv 1810.04650, isl-org/MultiObjectiveOptimization): 100 epochs,
  batch 256, Adam, learning rate × 0.85 every 10 epochs. Their script reads the learning rate from a per-run file
  that is not published for MultiMNIST; we use 1e-3, the rate of ParetoMTL's MultiMNIST experiments.
- ``quick`` (default, REDUCED): the first 10,000 of the 50,000 training samples, 8 epochs, batch 256, Adam 1e-3,
  validation and test on the full 10,000 each. Sized so that the README's default comparison (two single-task
  baselines and seven methods, one seed) finishes in about a quarter of an hour on two CPU cores; 8 epochs leave
  IGBv2's policy (which acts from epoch 6) three epochs.

``data_dir``: a directory of the standard IDX files for the benchmark's source (MNIST for ``multimnist``,
Fashion-MNIST for ``multifashion``), or one with ``mnist/`` and ``fashion/`` subdirectories (required for
``multifashion_mnist``). Without it the installed sources are used (see :mod:`taskbalance.benchmarks.datasets.mnist`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import Benchmark, Metric, MultiTaskModel, Split, TrainingProtocol
from .batches import TensorBatches
from .datasets.mnist import installed_sources
from .datasets.multimnist import SOURCES, DatasetName, MultiMNIST, load_multimnist
from .models.multilenet import MultiLeNet

#: the pairing / train-validation split seed, the same for every run seed
DATA_SEED = 0
VAL_SIZE = 10_000
_TASKS = ("left", "right")

_PAPER = TrainingProtocol(
    name="paper", epochs=100, batch_size=256, lr=1e-3, lr_step=10, lr_gamma=0.85,
    description="50k train / 10k val / 10k test, 100 epochs, batch 256, Adam 1e-3 × 0.85 every 10 epochs "
    "(Sener & Koltun's schedule)",
)  # fmt: skip
PROTOCOLS: dict[str, TrainingProtocol] = {
    "paper": _PAPER,
    "quick": _PAPER.reduced_to(
        "quick",
        "10k of the 50k training samples, 8 epochs, batch 256, Adam 1e-3; full 10k val / 10k test",
        epochs=8,
        train_size=10_000,
    ),
}


class AccuracyEvaluator:
    """Per-task accuracy (%) of classification logits; counts stay on the device until :meth:`compute`."""

    def __init__(self, tasks: tuple[str, ...]) -> None:
        self.tasks = tasks
        self.correct: Tensor | None = None
        self.count = 0

    def update(self, outputs: list[Tensor], targets: Any) -> None:
        hits = torch.stack([(out.argmax(1) == targets[:, k]).sum() for k, out in enumerate(outputs)])
        self.correct = hits if self.correct is None else self.correct + hits
        self.count += int(targets.shape[0])

    def compute(self) -> dict[str, float]:
        if self.correct is None or self.count == 0:
            raise ValueError("no batches were evaluated")
        values = (self.correct.double() * 100.0 / self.count).tolist()
        return {f"acc/{task}": float(v) for task, v in zip(self.tasks, values, strict=True)}


class MultiMNISTFamily(Benchmark):
    """Shared implementation of the three two-task MNIST-style benchmarks (see the module docstring)."""

    dataset: ClassVar[DatasetName]
    tasks: ClassVar[tuple[str, ...]] = _TASKS
    metrics: ClassVar[tuple[Metric, ...]] = tuple(Metric(f"acc/{t}", t, higher_is_better=True) for t in _TASKS)
    protocols: ClassVar[dict[str, TrainingProtocol]] = PROTOCOLS
    default_protocol: ClassVar[str] = "quick"

    def __init__(self, protocol: str | None = None, data_dir: str | None = None) -> None:
        super().__init__(protocol, data_dir)
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._paths = self._source_paths(data_dir)

    def _source_paths(self, data_dir: str | None) -> dict[str, Path | None]:
        if data_dir is None:
            return {"mnist": None, "fashion": None}
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data-dir {root} is not a directory")
        paths: dict[str, Path | None] = {}
        for source in ("mnist", "fashion"):
            sub = root / source
            paths[source] = sub if sub.is_dir() else None
        used = set(SOURCES[self.dataset])
        if len(used) == 1:
            (source,) = used
            if paths[source] is None:
                paths[source] = root
        missing = [s for s in sorted(used) if paths[s] is None]
        if missing:
            raise FileNotFoundError(
                f"{root} needs subdirectories {' and '.join(f'{s}/' for s in sorted(used))} of IDX files for "
                f"{self.name}; missing: {', '.join(missing)}"
            )
        return paths

    def data_sources(self) -> dict[str, Path]:
        if self.data_dir is not None:
            return super().data_sources()
        return {k: v for source in sorted(set(SOURCES[self.dataset])) for k, v in installed_sources(source).items()}

    def split_data(self, split: Split) -> MultiMNIST:
        """The split as constructed (train already cut to the protocol's ``train_size``)."""
        data = load_multimnist(
            self.dataset,
            split,
            seed=DATA_SEED,
            val_size=VAL_SIZE,
            mnist_path=self._paths["mnist"],
            fashion_path=self._paths["fashion"],
        )
        size = self.protocol.train_size
        if split == "train" and size is not None and size < len(data):
            data = data.subset(size)
        return data

    def _tensors(self, split: Split) -> tuple[Tensor, Tensor]:
        if split not in self._splits:
            self._splits[split] = self.split_data(split).tensors()
        return self._splits[split]

    def loader(self, split: Split, *, batch_size: int, shuffle: bool, generator: torch.Generator) -> TensorBatches:
        inputs, targets = self._tensors(split)
        return TensorBatches(inputs, targets, batch_size, shuffle, generator)

    def model(self) -> MultiTaskModel:
        # cast: the protocol's mutable ``encoder: nn.Module`` attribute is invariant, MultiLeNet's is a Sequential
        return cast(MultiTaskModel, MultiLeNet(n_tasks=len(self.tasks), n_classes=10))

    def losses(self, outputs: list[Tensor], targets: Any) -> Tensor:
        return torch.stack([F.cross_entropy(out, targets[:, k]) for k, out in enumerate(outputs)])

    def evaluator(self) -> AccuracyEvaluator:
        return AccuracyEvaluator(self.tasks)


class MultiMNISTBenchmark(MultiMNISTFamily):
    """MultiMNIST: two overlapping MNIST digits, classify the left one and the right one."""

    name: ClassVar[str] = "multimnist"
    dataset: ClassVar[DatasetName] = "multimnist"


class MultiFashionBenchmark(MultiMNISTFamily):
    """MultiFashion: two overlapping Fashion-MNIST items, classify the left one and the right one."""

    name: ClassVar[str] = "multifashion"
    dataset: ClassVar[DatasetName] = "multifashion"


class MultiFashionMNISTBenchmark(MultiMNISTFamily):
    """Multi-(Fashion+MNIST): a Fashion-MNIST item (left task) overlapped by an MNIST digit (right task)."""

    name: ClassVar[str] = "multifashion_mnist"
    dataset: ClassVar[DatasetName] = "multifashion_mnist"
