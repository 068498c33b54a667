"""Cityscapes (segmentation, depth) from MTAN's preprocessed ``.npy`` release.

Data (Cordts et al., CVPR 2016; preprocessed by Liu, Johns & Davison for MTAN, CVPR 2019, arXiv 1803.10704):
2,975 training and 500 test images of street scenes resized to 128×256, laid out as ::

    <data_dir>/train/{image,label_7,label_19,depth}/<i>.npy     i = 0 … 2974
    <data_dir>/val/{image,label_7,label_19,depth}/<i>.npy       i = 0 … 499   (the papers' test set)

    image    (128, 256, 3) float RGB in [0, 1]
    label_7  (128, 256)    7 classes 0 … 6, −1 = void;  label_19: the 19 standard classes 0 … 18, −1 = void
    depth    (128, 256, 1) 0 = no measurement

LibMTL's copy of the same data names the 7-class folder ``label``; it is accepted when ``label_7`` is absent.
The 7-class task is the standard one (Nash-MTL, CAGrad, FAMO, IGB); ``n_classes=19`` selects the other.

Split, tasks, losses and metrics as NYUv2 (:mod:`taskbalance.benchmarks.nyuv2`) without normals: a fixed 12 % of
``train`` held out as validation (357 images), the release's ``val`` as test.

Protocols:

- ``paper`` / ``paper-split``: 200 epochs, batch 8, Adam 1e-4, StepLR(100, 0.5), SegNet-MTAN / SegNet split,
  random scale crop + flip on training images (CAGrad's and Nash-MTL's option; MTAN itself used none).
- ``quick`` / ``quick-split``: REDUCED, for a CPU in minutes: every 4th pixel (32×64), width-8 models, 128
  training images, 64 validation and 64 test images, 6 epochs of batch 16 at Adam 1e-3 (StepLR(3, 0.5)).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .base import Metric, TrainingProtocol
from .datasets.mnist import DataSourceError
from .dense import DenseBenchmark, dense_protocols
from .metrics.dense import Reduction, metrics_for

N_CLASSES = (7, 19)

_LAYOUT = (
    "Expected MTAN's preprocessed Cityscapes: <data_dir>/{train,val}/{image,label_7,label_19,depth}/<i>.npy with "
    "image (128, 256, 3), label_7 (128, 256) in −1 … 6 (or LibMTL's 'label' folder), label_19 in −1 … 18, "
    "depth (128, 256, 1)."
)


class CityscapesBenchmark(DenseBenchmark):
    """Cityscapes: 7-class (or 19-class) segmentation and depth at 128×256 (see the module docstring).

    Args: as :class:`~.dense.DenseBenchmark`, plus ``n_classes`` (7 or 19).
    """

    name: ClassVar[str] = "cityscapes"
    tasks: ClassVar[tuple[str, ...]] = ("segmentation", "depth")
    metrics: ClassVar[tuple[Metric, ...]] = metrics_for(tasks)
    folders: ClassVar[dict[str, str]] = {"image": "image", "label": "label_7", "depth": "depth"}
    layout: ClassVar[str] = _LAYOUT
    protocols: ClassVar[dict[str, TrainingProtocol]] = dense_protocols(
        200, 8, "random scale crop + flip",
        "6 epochs, batch 16, Adam 1e-3, StepLR(3, 0.5), every 4th pixel (32×64), 128 train / 64 val / 64 test images",
        epochs=6, batch_size=16, lr=1e-3, width=8, subsample=4, train_size=128, eval_size=64, lr_step=3,
    )  # fmt: skip
    default_protocol: ClassVar[str] = "paper"

    def __init__(
        self,
        protocol: str | None = None,
        data_dir: str | None = None,
        *,
        n_classes: int = 7,
        reduction: Reduction = "pixel",
        augment: bool | None = None,
        split_seed: int = 0,
    ) -> None:
        if n_classes not in N_CLASSES:
            raise ValueError(f"Cityscapes n_classes must be 7 or 19, got {n_classes}")
        super().__init__(protocol, data_dir, reduction=reduction, augment=augment, split_seed=split_seed)
        self.n_classes = n_classes

    def label_folders(self, root: Path) -> dict[str, str]:
        """``label_7`` / ``label_19``; for 7 classes, LibMTL's ``label`` when ``label_7`` is absent."""
        folder = f"label_{self.n_classes}"
        if not (root / "train" / folder).is_dir() and self.n_classes == 7 and (root / "train" / "label").is_dir():
            folder = "label"
        if not (root / "train" / folder).is_dir():
            raise DataSourceError(f"{root / 'train' / folder} is missing. {self.layout}")
        return {**self.folders, "label": folder}
