"""The SegNet benchmarks on a preprocessed ``.npy`` release (NYUv2, Cityscapes): batching with augmentation,
the paper and quick protocols, losses, metrics and models.

Data: :mod:`taskbalance.benchmarks.datasets.dense`. Tasks and losses: segmentation (cross-entropy, label −1
ignored), depth (L1 on valid pixels), normals (1 − cos on valid pixels). Metrics:
:mod:`taskbalance.benchmarks.metrics.dense`. Models: :mod:`taskbalance.benchmarks.models.segnet`.

Split: the releases have no validation split (their ``val`` is what the papers report as test). We hold out a
fixed fraction of ``train`` as validation (the same for every method and seed: a permutation seeded with
``split_seed``) and train on the rest; ``test`` is the release's ``val``. The papers train on all of ``train``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Benchmark, MultiTaskModel, Split, TrainingProtocol
from .batches import Batches, Positions
from .datasets.dense import DenseFolder, scale_crop_flip
from .datasets.mnist import DataSourceError
from .metrics.dense import DenseEvaluator, Reduction, depth_loss, normal_loss, segmentation_loss
from .models.segnet import SegNetMTAN, SegNetSplit

MODELS = ("mtan", "split")


# -- batching --------------------------------------------------------------------------------------------------
class DenseLoader(Batches[tuple[Tensor, tuple[Tensor, ...]]]):
    """Batches ``(image, (target per task …))`` of the samples ``indices`` of a :class:`DenseFolder`.

    Each pass draws its order (when ``shuffle``) and then every sample's augmentation up front from ``generator``
    (see :mod:`~.batches`). Targets follow ``tasks`` (kinds "segmentation" → label, "depth", "normal").
    """

    def __init__(
        self,
        folder: DenseFolder,
        indices: Sequence[int],
        tasks: Sequence[str],
        *,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator,
        augment: bool,
        subsample: int,
    ) -> None:
        super().__init__(len(indices), batch_size, shuffle, generator)
        self.folder = folder
        self.indices = list(indices)
        self.kinds = ["label" if t == "segmentation" else t for t in tasks]
        self.augment = augment
        self.subsample = subsample
        self._draws: Tensor | None = None

    def start_pass(self) -> None:
        """Every sample's augmentation draws for the pass, up front (so they do not depend on how far it got)."""
        self._draws = (
            torch.rand((self.size, 4), generator=self.generator, dtype=torch.float64) if self.augment else None
        )

    def batch(self, positions: Positions) -> tuple[Tensor, tuple[Tensor, ...]]:
        samples = []
        chosen = range(self.size)[positions] if isinstance(positions, slice) else positions.tolist()
        for position in chosen:
            sample = self.folder.load(self.indices[position])
            if self.subsample > 1:
                sample = {k: v[..., :: self.subsample, :: self.subsample] for k, v in sample.items()}
            if self._draws is not None:
                sample = scale_crop_flip(sample, self._draws[position])
            samples.append(sample)
        image = torch.stack([s["image"] for s in samples])
        return image, tuple(torch.stack([s[kind] for s in samples]) for kind in self.kinds)


# -- the benchmark ---------------------------------------------------------------------------------------------
_TASK_LOSSES = {"segmentation": segmentation_loss, "depth": depth_loss, "normal": normal_loss}


def dense_protocols(
    paper_epochs: int, paper_batch_size: int, what: str, quick_description: str, **quick: Any
) -> dict[str, TrainingProtocol]:
    """``paper`` and ``quick`` protocols for each model ("-split" names the SegNet split variants): the paper's
    schedule at ``paper_epochs`` × ``paper_batch_size``, and a REDUCED one that changes the
    :class:`TrainingProtocol` fields given as ``quick``; all of them augment the training images."""
    paper = f"MTAN's schedule: {paper_epochs} epochs, batch {paper_batch_size}, Adam 1e-4, StepLR(100, 0.5), {what}"
    protocols: dict[str, TrainingProtocol] = {}
    for model, label in (("mtan", "SegNet-MTAN"), ("split", "SegNet split")):
        suffix = "" if model == "mtan" else "-split"
        protocols["paper" + suffix] = TrainingProtocol(
            name="paper" + suffix,
            epochs=paper_epochs,
            batch_size=paper_batch_size,
            lr=1e-4,
            description=f"{paper}, {label}",
            lr_step=100,
            model=model,
            augment=True,
        )
        protocols["quick" + suffix] = protocols["paper" + suffix].reduced_to(
            "quick" + suffix,
            f"{quick_description}, {label} at width {quick['width']}",
            **quick,
        )
    return protocols


class DenseBenchmark(Benchmark):
    """A SegNet benchmark on a preprocessed ``.npy`` release (NYUv2, Cityscapes).

    Subclasses set the :class:`Benchmark` class attributes and ``folders`` (modality → folder in the release),
    ``n_classes``, ``layout`` (the expected layout, quoted in errors) and ``val_fraction``.

    Args:
        protocol: a name in :attr:`protocols` (paper, paper-split, quick, quick-split).
        data_dir: the release's top folder.
        reduction: how depth and normal errors are averaged ("pixel", or the reference's "batch"; see
            :mod:`~.metrics.dense`).
        augment: override the protocol's training augmentation.
        split_seed: seed of the fixed train/validation split.
    """

    folders: ClassVar[dict[str, str]]
    n_classes: int
    layout: ClassVar[str]
    val_fraction: ClassVar[float] = 0.12
    protocols: ClassVar[dict[str, TrainingProtocol]]

    def __init__(
        self,
        protocol: str | None = None,
        data_dir: str | None = None,
        *,
        reduction: Reduction = "pixel",
        augment: bool | None = None,
        split_seed: int = 0,
    ) -> None:
        super().__init__(protocol, data_dir)
        if reduction not in ("pixel", "batch"):
            raise ValueError(f"reduction must be 'pixel' or 'batch', got {reduction!r}")
        self.reduction: Reduction = reduction
        self.augment = self.protocol.augment if augment is None else augment
        self.split_seed = split_seed
        self._folders: dict[str, DenseFolder] = {}
        self._indices: dict[str, list[int]] = {}

    # data
    def _folder(self, release_split: str) -> DenseFolder:
        if release_split not in self._folders:
            if self.data_dir is None:
                raise DataSourceError(
                    f"{self.name} needs data_dir (--data-dir): no copy can be installed. {self.layout}"
                )
            root = Path(self.data_dir).expanduser()
            if not root.is_dir():
                raise DataSourceError(f"{self.name}: data_dir {root} is not a directory. {self.layout}")
            self._folders[release_split] = DenseFolder(
                root, release_split, self.label_folders(root), self.n_classes, self.layout
            )
        return self._folders[release_split]

    def label_folders(self, root: Path) -> dict[str, str]:
        """Modality kind → folder name under ``root/<split>``; Cityscapes picks its label folder here."""
        return self.folders

    def split_indices(self, split: Split) -> list[int]:
        """The release indices that make up ``split`` (train/val from the release's train, test = its val),
        cut to the protocol's ``train_size`` / ``eval_size``."""
        if split not in self._indices:
            if split == "test":
                indices = list(range(len(self._folder("val"))))
            else:
                n = len(self._folder("train"))
                n_val = max(1, round(n * self.val_fraction))
                if n - n_val < 1:
                    raise DataSourceError(f"{self.name}: {n} training images cannot be split into train and val")
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
                indices = sorted(order[:n_val]) if split == "val" else sorted(order[n_val:])
            limit = self.protocol.train_size if split == "train" else self.protocol.eval_size
            self._indices[split] = indices if limit is None else indices[:limit]
        return self._indices[split]

    def loader(self, split: Split, *, batch_size: int, shuffle: bool, generator: torch.Generator) -> DenseLoader:
        folder = self._folder("val" if split == "test" else "train")
        return DenseLoader(
            folder,
            self.split_indices(split),
            self.tasks,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            augment=self.augment and split == "train",
            subsample=self.protocol.subsample,
        )

    def to_device(self, batch: Any, device: torch.device) -> tuple[Tensor, tuple[Tensor, ...]]:
        image, targets = batch
        return image.to(device), tuple(t.to(device) for t in targets)

    # model, losses, metrics
    def task_channels(self) -> list[int]:
        """Output channels per task: classes for segmentation, 1 for depth, 3 for normals."""
        return [{"segmentation": self.n_classes, "depth": 1, "normal": 3}[t] for t in self.tasks]

    def model(self) -> MultiTaskModel:
        model_class = SegNetMTAN if self.protocol.model == "mtan" else SegNetSplit
        return model_class(self.task_channels(), width=self.protocol.width)

    def losses(self, outputs: list[Tensor], targets: Any) -> Tensor:
        return torch.stack([_TASK_LOSSES[t](o, y) for t, o, y in zip(self.tasks, outputs, targets, strict=True)])

    def evaluator(self) -> DenseEvaluator:
        return DenseEvaluator(self.tasks, self.n_classes, self.reduction)
