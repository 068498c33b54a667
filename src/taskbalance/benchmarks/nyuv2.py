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

Tasks, losses, metrics, models and batching: the dense benchmarks' (:mod:`taskbalance.benchmarks.dense`).

Protocols:

- ``paper`` / ``paper-split``: MTAN's schedule as used by Nash-MTL, FAMO and IGB: 200 epochs, batch 2, Adam 1e-4,
  StepLR(100, 0.5), full resolution, SegNet-MTAN / SegNet split. Training augmentation as in Nash-MTL (the MTAN
  paper itself used none): random scale crop (scale 1, 1.2 or 1.5: crop a 1/scale window, resize it back, divide
  depth by the scale) and a horizontal flip with probability ½ that also negates the normals' x component.
- ``quick`` / ``quick-split``: REDUCED, for a CPU in minutes: every 3rd pixel (96×128), width-8 models, 64
  training images, 32 validation and 32 test images, 6 epochs of batch 8 at Adam 1e-3 (StepLR(3, 0.5)).
"""

from __future__ import annotations

from typing import ClassVar

from .base import Metric, TrainingProtocol
from .dense import DenseBenchmark, dense_protocols
from .metrics.dense import metrics_for

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
        200, 2, "random scale crop + flip",
        "6 epochs, batch 8, Adam 1e-3, StepLR(3, 0.5), every 3rd pixel (96×128), 64 train / 32 val / 32 test images",
        epochs=6, batch_size=8, lr=1e-3, width=8, subsample=3, train_size=64, eval_size=32, lr_step=3,
    )  # fmt: skip
    default_protocol: ClassVar[str] = "paper"
