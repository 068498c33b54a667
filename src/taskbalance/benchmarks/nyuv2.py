"""NYUv2 (segmentation, depth, surface normals) from MTAN's preprocessed ``.npy`` release; and the machinery that
the dense benchmarks share (folder reading, augmentation, batching, the benchmark class).

Data (Silberman et al., ECCV 2012; preprocessed by Liu, Johns & Davison for MTAN, CVPR 2019, arXiv 1803.10704):
795 training and 654 test images of indoor scenes at 288×384, laid out as ::

    <data_dir>/train/{image,label,depth,normal}/<i>.npy     i = 0 … 794
    <data_dir>/val/{image,label,depth,normal}/<i>.npy       i = 0 … 653   (the papers' test set)

    image  (288, 384, 3) float RGB in [0, 1]
    label  (288, 384)    13 classes 0 … 12, −1 = unlabelled (stored as floats or integers)
    depth  (288, 384, 1) metres, 0 = no measurement
    normal (288, 384, 3) unit surface normals (x, y, z), 0 = no measurement

The release has no validation split (its ``val`` is what the papers report as test). We hold out a fixed 12 % of
``train`` as validation (95 images; the same for every method and seed: a permutation seeded with
``split_seed``) and train on the other 700; ``test`` is the release's ``val``. The papers train on all 795.

Tasks and losses: segmentation (cross-entropy, label −1 ignored), depth (L1 on valid pixels), normals (1 − cos on
valid pixels). Metrics: :mod:`taskbalance.benchmarks.dense_metrics`. Models: :mod:`~.dense_models`.

Protocols:

- ``paper`` / ``paper-split``: MTAN's schedule as used by Nash-MTL, FAMO and IGB: 200 epochs, batch 2, Adam 1e-4,
  StepLR(100, 0.5), full resolution, SegNet-MTAN / SegNet split. Training augmentation as in Nash-MTL (the MTAN
  paper itself used none): random scale crop (scale 1, 1.2 or 1.5: crop a 1/scale window, resize it back, divide
  depth by the scale) and a horizontal flip with probability ½ that also negates the normals' x component.
- ``quick`` / ``quick-split``: REDUCED, for a CPU in minutes: every 3rd pixel (96×128), width-8 models, 64
  training images, 32 validation and 32 test images, 6 epochs of batch 8 at Adam 1e-3 (StepLR(3, 0.5)).

Deliberate difference from the reference augmentation: normals are resized with nearest-neighbour sampling, like
labels and depth; the reference's bilinear resize blends valid and missing (zero) normals into short vectors,
which the cosine loss then treats as valid, and it would also need renormalising.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Benchmark, Metric, MultiTaskModel, Split, TrainingProtocol
from .dense_metrics import (
    DenseEvaluator,
    Reduction,
    depth_loss,
    metrics_for,
    normal_loss,
    segmentation_loss,
)
from .dense_models import SegNetMTAN, SegNetSplit
from .mnist import DataSourceError

#: random-scale-crop scales (MTAN issue 34, used by Nash-MTL, CAGrad, FAMO)
SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)
MODELS = ("mtan", "split")
#: the channels each modality has on disk (HWC); label is (H, W)
_CHANNELS = {"image": 3, "depth": 1, "normal": 3}


@dataclass(frozen=True)
class DenseProtocol(TrainingProtocol):
    """A dense benchmark's protocol: :class:`TrainingProtocol` plus the model and data settings it fixes."""

    #: "mtan" (SegNet-MTAN) or "split" (SegNet with per-task heads)
    model: str = "mtan"
    #: channels of the first SegNet stage (64 in the papers)
    width: int = 64
    #: keep every ``subsample``-th pixel in each direction (1 = full resolution)
    subsample: int = 1
    #: first N images of the validation and test splits (None = all)
    eval_size: int | None = None
    #: random scale crop and flip on training images
    augment: bool = True
    #: StepLR period (epochs) and factor
    lr_step: int = 100
    lr_gamma: float = 0.5


# -- reading the release ---------------------------------------------------------------------------------------
class DenseFolder:
    """One split folder of a preprocessed release: ``<root>/<split>/<modality>/<i>.npy``, i = 0 … n−1.

    Args:
        root: the release's top folder (``data_dir``).
        split: "train" or "val" (the release's names).
        folders: modality kind ("image", "label", "depth", "normal") → its folder name in the release.
        n_classes: segmentation classes; labels must be integers in −1 … n_classes − 1.
        layout: the expected layout, quoted in every error.

    Raises:
        DataSourceError: a folder is missing, empty, or its files are not numbered 0 … n−1 in every modality.
    """

    def __init__(self, root: Path, split: str, folders: Mapping[str, str], n_classes: int, layout: str) -> None:
        self.path = root / split
        self.folders = dict(folders)
        self.n_classes = n_classes
        self.layout = layout
        counts = {}
        for kind, folder in self.folders.items():
            directory = self.path / folder
            if not directory.is_dir():
                raise DataSourceError(f"{directory} is missing. {layout}")
            names = {p.name for p in directory.glob("*.npy")}
            counts[kind] = len(names)
            expected = {f"{i}.npy" for i in range(len(names))}
            if not names or names != expected:
                stray = sorted(names - expected)[:3]
                raise DataSourceError(
                    f"{directory} must hold 0.npy … (n−1).npy"
                    + (f"; found {', '.join(stray)}" if stray else "; it is empty")
                    + f". {layout}"
                )
        if len(set(counts.values())) != 1:
            raise DataSourceError(f"{self.path}: the modalities hold different numbers of files {counts}. {layout}")
        self.size = next(iter(counts.values()))

    def __len__(self) -> int:
        return self.size

    def _array(self, kind: str, index: int) -> tuple[np.ndarray, Path]:
        path = self.path / self.folders[kind] / f"{index}.npy"
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataSourceError(f"{path}: not a readable .npy array ({error}). {self.layout}") from error
        if array.dtype.kind not in "fiu":
            raise DataSourceError(f"{path}: expected a numeric array, got dtype {array.dtype}. {self.layout}")
        return array, path

    def load(self, index: int) -> dict[str, Tensor]:
        """Sample ``index`` as tensors: image (3, H, W), depth (1, H, W), normal (3, H, W) float32; label (H, W)
        int64 (−1 = ignored)."""
        sample: dict[str, Tensor] = {}
        size: tuple[int, int] | None = None
        for kind in self.folders:
            array, path = self._array(kind, index)
            if kind == "label":
                if array.ndim != 2:
                    raise DataSourceError(f"{path}: a label map must be (H, W), got {array.shape}. {self.layout}")
                if not np.array_equal(array, np.round(array)) or array.min() < -1 or array.max() >= self.n_classes:
                    raise DataSourceError(
                        f"{path}: labels must be integers in −1 … {self.n_classes - 1} (−1 = ignored), found values "
                        f"in [{array.min()}, {array.max()}]. {self.layout}"
                    )
                tensor = torch.from_numpy(array.astype(np.int64))
            else:
                channels = _CHANNELS[kind]
                if kind == "depth" and array.ndim == 2:
                    array = array[..., None]
                if array.ndim != 3 or array.shape[-1] != channels:
                    raise DataSourceError(
                        f"{path}: {kind} must be (H, W, {channels}) channels-last, got {array.shape}. {self.layout}"
                    )
                tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=np.float32))
            hw = (int(tensor.shape[-2]), int(tensor.shape[-1]))
            if size is not None and hw != size:
                raise DataSourceError(f"{path}: size {hw} differs from the sample's image size {size}. {self.layout}")
            size = hw
            sample[kind] = tensor
        return sample


# -- augmentation ----------------------------------------------------------------------------------------------
def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if mode == "bilinear":
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=True)[0]
    return F.interpolate(x[None], size=size, mode="nearest")[0]


def scale_crop_flip(sample: dict[str, Tensor], draws: Tensor) -> dict[str, Tensor]:
    """Random scale crop and horizontal flip of one sample, from four uniform draws in [0, 1).

    draws[0] picks the scale s in :data:`SCALES`, draws[1:3] the crop's top-left corner, draws[3] < ½ flips.
    The crop (H/s × W/s) is resized back to H × W (image bilinear, the rest nearest); depth is divided by s (the
    scene looks s times closer); a flip mirrors every map and negates the normals' x component.
    """
    height, width = sample["image"].shape[-2:]
    u = draws.tolist()
    scale = SCALES[min(int(u[0] * len(SCALES)), len(SCALES) - 1)]
    h, w = int(height / scale), int(width / scale)
    top, left = int(u[1] * (height - h + 1)), int(u[2] * (width - w + 1))
    flip = u[3] < 0.5
    out: dict[str, Tensor] = {}
    for kind, x in sample.items():
        crop = x[..., top : top + h, left : left + w]
        if kind == "label":
            resized = _resize(crop[None].float(), (height, width), "nearest")[0].long()
        else:
            resized = _resize(crop, (height, width), "bilinear" if kind == "image" else "nearest")
        if kind == "depth":
            resized = resized / scale
        if flip:
            resized = resized.flip(-1)
            if kind == "normal":
                resized[0] = -resized[0]
        out[kind] = resized
    return out


# -- batching --------------------------------------------------------------------------------------------------
class DenseLoader:
    """Batches ``(image, (target per task …))`` of the samples ``indices`` of a :class:`DenseFolder`.

    Each pass draws its order (when ``shuffle``) and every sample's augmentation up front from ``generator``, so
    the generator's state after the first batch, and every batch's content, depend only on its state before the
    pass. Targets follow ``tasks`` (kinds "segmentation" → label, "depth", "normal").
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.folder = folder
        self.indices = list(indices)
        self.kinds = ["label" if t == "segmentation" else t for t in tasks]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.augment = augment
        self.subsample = subsample

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        n = len(self.indices)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        draws = torch.rand((n, 4), generator=self.generator, dtype=torch.float64) if self.augment else None
        for start in range(0, n, self.batch_size):
            samples = []
            for position in order[start : start + self.batch_size].tolist():
                sample = self.folder.load(self.indices[position])
                if self.subsample > 1:
                    sample = {k: v[..., :: self.subsample, :: self.subsample] for k, v in sample.items()}
                if draws is not None:
                    sample = scale_crop_flip(sample, draws[position])
                samples.append(sample)
            image = torch.stack([s["image"] for s in samples])
            yield image, tuple(torch.stack([s[kind] for s in samples]) for kind in self.kinds)


# -- the benchmark ---------------------------------------------------------------------------------------------
_TASK_LOSSES = {"segmentation": segmentation_loss, "depth": depth_loss, "normal": normal_loss}


def dense_protocols(epochs: int, batch_size: int, what: str, quick: Mapping[str, Any]) -> dict[str, TrainingProtocol]:
    """``paper`` and ``quick`` protocols for each model ("-split" names the SegNet split variants): the paper's
    schedule at ``epochs`` × ``batch_size``, and a REDUCED one from the :class:`DenseProtocol` fields in ``quick``."""
    paper = f"MTAN's schedule: {epochs} epochs, batch {batch_size}, Adam 1e-4, StepLR(100, 0.5), {what}"
    protocols: dict[str, TrainingProtocol] = {}
    for model, label in (("mtan", "SegNet-MTAN"), ("split", "SegNet split")):
        suffix = "" if model == "mtan" else "-split"
        protocols["paper" + suffix] = DenseProtocol(
            name="paper" + suffix,
            epochs=epochs,
            batch_size=batch_size,
            lr=1e-4,
            description=f"{paper}, {label}",
            model=model,
        )
        protocols["quick" + suffix] = DenseProtocol(
            name="quick" + suffix,
            description=f"{quick['description']}, {label} at width {quick['width']}",
            reduced=True,
            model=model,
            **{k: v for k, v in quick.items() if k != "description"},
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
            :mod:`~.dense_metrics`).
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
        assert isinstance(self.protocol, DenseProtocol)
        self.settings: DenseProtocol = self.protocol
        if reduction not in ("pixel", "batch"):
            raise ValueError(f"reduction must be 'pixel' or 'batch', got {reduction!r}")
        self.reduction: Reduction = reduction
        self.augment = self.settings.augment if augment is None else augment
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
            limit = self.settings.train_size if split == "train" else self.settings.eval_size
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
            subsample=self.settings.subsample,
        )

    def to_device(self, batch: Any, device: torch.device) -> tuple[Tensor, tuple[Tensor, ...]]:
        image, targets = batch
        return image.to(device), tuple(t.to(device) for t in targets)

    # model, losses, metrics
    def task_channels(self) -> list[int]:
        """Output channels per task: classes for segmentation, 1 for depth, 3 for normals."""
        return [{"segmentation": self.n_classes, "depth": 1, "normal": 3}[t] for t in self.tasks]

    def model(self) -> MultiTaskModel:
        model_class = SegNetMTAN if self.settings.model == "mtan" else SegNetSplit
        return model_class(self.task_channels(), width=self.settings.width)

    def losses(self, outputs: list[Tensor], targets: Any) -> Tensor:
        return torch.stack([_TASK_LOSSES[t](o, y) for t, o, y in zip(self.tasks, outputs, targets, strict=True)])

    def evaluator(self) -> DenseEvaluator:
        return DenseEvaluator(self.tasks, self.n_classes, self.reduction)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.settings.lr_step, gamma=self.settings.lr_gamma)


_NYUV2_LAYOUT = (
    "Expected MTAN's preprocessed NYUv2: <data_dir>/{train,val}/{image,label,depth,normal}/<i>.npy with image "
    "(288, 384, 3), label (288, 384) in −1 … 12, depth (288, 384, 1), normal (288, 384, 3)."
)


class NYUv2Benchmark(DenseBenchmark):
    """NYUv2: segmentation (13 classes), depth and surface normals at 288×384 (see the module docstring)."""

    name: ClassVar[str] = "nyuv2"
    tasks: ClassVar[tuple[str, ...]] = ("segmentation", "depth", "normal")
    metrics: ClassVar[tuple[Metric, ...]] = metrics_for(tasks)
    folders: ClassVar[dict[str, str]] = {"image": "image", "label": "label", "depth": "depth", "normal": "normal"}
    n_classes = 13
    layout: ClassVar[str] = _NYUV2_LAYOUT
    protocols: ClassVar[dict[str, TrainingProtocol]] = dense_protocols(
        200,
        2,
        "random scale crop + flip",
        {
            "description": "6 epochs, batch 8, Adam 1e-3, StepLR(3, 0.5), every 3rd pixel (96×128), "
            "64 train / 32 val / 32 test images",
            "epochs": 6,
            "batch_size": 8,
            "lr": 1e-3,
            "width": 8,
            "subsample": 3,
            "train_size": 64,
            "eval_size": 32,
            "lr_step": 3,
        },
    )
    default_protocol: ClassVar[str] = "paper"


__all__ = ["DenseBenchmark", "DenseFolder", "DenseLoader", "DenseProtocol", "NYUv2Benchmark"]
