"""CelebA: 40 binary face attributes as 40 tasks, from the official aligned-and-cropped release at a user path.

Data (Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015): 202,599 aligned 178×218 JPEGs, the
40 attributes of each (``list_attr_celeba.txt``: a count line, the attribute names, then ``<file> ±1 × 40``) and
the official partition (``list_eval_partition.txt``: ``<file> 0|1|2`` for train / val / test, 162,770 / 19,867 /
19,962 images). The files may sit directly under ``data_dir`` or in the release's ``Img/``, ``Anno/``, ``Eval/``
folders; ``img_align_celeba_png`` (PNG copies, as Sener & Koltun's loader reads) is accepted too.

Construction as in the MTL papers (Sener & Koltun, NeurIPS 2018, arXiv 1810.04650; FAMO, Liu et al., NeurIPS
2023, arXiv 2306.03792): the whole image resized to 64×64 with Pillow's bilinear (antialiased) filter — the
aspect ratio is not kept, as with torchvision's ``Resize((64, 64))`` in FAMO's loader — RGB scaled to [0, 1]; −1
becomes 0. Resized images are decoded once (Pillow, in threads) and cached as uint8 arrays
(:mod:`taskbalance.benchmarks.cache`), keyed by the data path, the contents of the two text files, the image size
and the subset, so a changed annotation file rebuilds the cache (a changed image under an unchanged name does not).

Model (:class:`CelebAResNet`): Sener & Koltun's ResNet-18 trunk (3×3 stride-1 stem, no max-pool, four stages of
two basic blocks, 64→512 channels, average-pooled to 2×2 → 2048 features at 64×64) and one linear head per
attribute. Loss: binary cross-entropy per attribute. Metric: per-attribute accuracy (higher is better) on the
official val / test partitions; :func:`mean_error` gives the papers' summary 1 − mean accuracy.

Deliberate differences: Sener & Koltun's heads are 2-way log-softmax classifiers trained with NLL; one logit with
BCE is the same model family with half the head parameters. Their loader subtracts a mean colour before resizing
and FAMO's uses none; we use none (BatchNorm follows the first convolution). FAMO reports F1 with a 9-layer plain
CNN; we report accuracy, the metric of Sener & Koltun and of most CelebA MTL tables, with their ResNet trunk, and
keep FAMO's training schedule (Adam 3e-4, batch 256, 15 epochs) as the ``paper`` protocol. The pooling is
adaptive (2×2 output), which equals the reference's fixed 4×4 average pooling at 64×64 and also serves the
``quick`` protocol's 32×32 inputs. The ``quick`` protocol is REDUCED (a subset, 32×32, width 8, 2 epochs)
because the Δm baselines alone are 40 single-task runs; it checks a pipeline, it does not reproduce a table.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from .base import Benchmark, Metric, Split, TrainingProtocol
from .cache import cached_arrays
from .mnist import DataSourceError

#: the 40 attributes in the official column order
ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIRS = ("img_align_celeba", "img_align_celeba_png")
PILLOW_INSTALL = "pip install 'taskbalance[celeba]'"
PARTITIONS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
_CACHE_VERSION = 1
_PROGRESS_MIN_IMAGES = 1000


class CelebALayout(NamedTuple):
    """Where the three parts of a CelebA release were found."""

    images: Path
    attributes: Path
    partition: Path


class Annotations(NamedTuple):
    """``files`` (N,) image names, ``labels`` (N, 40) uint8 in {0, 1}, ``partition`` (N,) int64 in {0, 1, 2}."""

    files: list[str]
    labels: np.ndarray
    partition: np.ndarray


class CelebASplit(NamedTuple):
    """One split: ``images`` (N, S, S, 3) uint8 RGB, ``labels`` (N, 40) uint8 in {0, 1}."""

    images: np.ndarray
    labels: np.ndarray


# -- locating and parsing -----------------------------------------------------------------------------------------
def find_layout(root: str | os.PathLike[str]) -> CelebALayout:
    """Find the image folder and the two annotation files under ``root`` (flat, or in Img/ Anno/ Eval/)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataSourceError(f"CelebA: {root} is not a directory; pass data_dir= pointing at the CelebA release")

    def first(candidates: Sequence[Path], what: str) -> Path:
        for candidate in candidates:
            if candidate.exists():
                return candidate
        listed = ", ".join(str(c.relative_to(root)) for c in candidates)
        raise DataSourceError(
            f"CelebA: no {what} under {root} (looked for {listed}); download the aligned-and-cropped release from "
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
        )

    images = first([base / d for base in (root, root / "Img") for d in IMAGE_DIRS], "image folder")
    attributes = first([root / ATTR_FILE, root / "Anno" / ATTR_FILE], ATTR_FILE)
    partition = first([root / PARTITION_FILE, root / "Eval" / PARTITION_FILE], PARTITION_FILE)
    return CelebALayout(images, attributes, partition)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataSourceError(f"{path}: cannot read ({error})") from error


def parse_attributes(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """(file names, labels (N, 40) uint8 with −1 → 0 and 1 → 1) of ``list_attr_celeba.txt``, validated."""
    path = Path(path)
    lines = _read_lines(path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataSourceError(f"{path}: expected a count on line 1 and the 40 attribute names on line 2")
    names = tuple(lines[1].split())
    if names != ATTRIBUTES:
        raise DataSourceError(f"{path}: line 2 must list the 40 CelebA attributes in the official order, got {names}")
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != int(lines[0]):
        raise DataSourceError(f"{path}: line 1 announces {int(lines[0])} images but {len(rows)} rows follow")
    for number, row in enumerate(rows, start=3):
        if len(row) != 1 + len(ATTRIBUTES):
            raise DataSourceError(f"{path}: line {number} has {len(row)} fields, expected 41 (a file name, 40 ±1)")
    files = [row[0] for row in rows]
    try:
        values = np.array([row[1:] for row in rows], dtype=np.int64).reshape(len(rows), len(ATTRIBUTES))
    except ValueError as error:
        raise DataSourceError(f"{path}: attribute values must be -1 or 1 ({error})") from error
    bad = np.flatnonzero(~np.isin(values, (-1, 1)).all(axis=1))
    if bad.size:
        raise DataSourceError(f"{path}: line {int(bad[0]) + 3} has a value other than -1 or 1")
    return files, (values > 0).astype(np.uint8)


def parse_partition(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{file name: 0 | 1 | 2}`` (train / val / test) of ``list_eval_partition.txt``, validated."""
    path = Path(path)
    partition: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataSourceError(f"{path}: line {number} must be '<file> 0|1|2', got {line!r}")
        partition[fields[0]] = int(fields[1])
    return partition


def read_annotations(layout: CelebALayout) -> Annotations:
    """Attributes joined with the partition by file name; every annotated image must have a partition."""
    files, labels = parse_attributes(layout.attributes)
    partition = parse_partition(layout.partition)
    missing = [name for name in files if name not in partition]
    if missing:
        raise DataSourceError(
            f"{layout.partition}: no partition for {len(missing)} annotated image(s), e.g. {missing[0]}; the two "
            "annotation files must come from the same release"
        )
    return Annotations(files, labels, np.array([partition[name] for name in files], dtype=np.int64))


# -- decoding -----------------------------------------------------------------------------------------------------
def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(f"decoding CelebA's JPEGs needs Pillow: {PILLOW_INSTALL}") from error
    return Image


def _image_path(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file() and directory.name.endswith("_png"):
        path = path.with_suffix(".png")
    return path


def decode_images(directory: Path, files: Sequence[str], size: int, workers: int | None = None) -> np.ndarray:
    """(N, size, size, 3) uint8: each image converted to RGB and resized (bilinear, antialiased) to size × size.

    Pillow releases the GIL while decoding and resizing, so a few threads decode in parallel.
    """
    image_module = _pil_image()
    bilinear = image_module.Resampling.BILINEAR

    def load(name: str) -> np.ndarray:
        path = _image_path(directory, name)
        try:
            with image_module.open(path) as image:
                return np.asarray(image.convert("RGB").resize((size, size), bilinear), dtype=np.uint8)
        except (OSError, ValueError) as error:
            raise DataSourceError(f"CelebA: cannot decode {path} ({error})") from error

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = tqdm(
            pool.map(load, files), total=len(files), desc="CelebA images", disable=len(files) < _PROGRESS_MIN_IMAGES
        )
        for index, array in enumerate(decoded):
            out[index] = array
    return out


def _cache_key(layout: CelebALayout) -> str:
    digest = hashlib.sha256(str(layout.images.resolve()).encode())
    for path in (layout.attributes, layout.partition):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_celeba(
    data_dir: str | os.PathLike[str], split: str, image_size: int = 64, limit: int | None = None, cache: bool = True
) -> CelebASplit:
    """The official ``split`` (``train`` / ``val`` / ``test``) resized to ``image_size``; only its first ``limit``
    images (in file order) when ``limit`` is given, so reduced protocols decode only what they use."""
    if split not in PARTITIONS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    layout = find_layout(data_dir)
    annotations = read_annotations(layout)
    indices = np.flatnonzero(annotations.partition == PARTITIONS[split])[:limit]
    if indices.size == 0:
        raise DataSourceError(f"{layout.partition}: the {split} partition is empty")
    labels = annotations.labels[indices]

    def build() -> dict[str, np.ndarray]:
        files = [annotations.files[i] for i in indices]
        return {"images": decode_images(layout.images, files, image_size), "labels": labels}

    name = f"celeba-v{_CACHE_VERSION}-{_cache_key(layout)}-{split}-{image_size}px-{limit or 'all'}.npz"
    arrays = cached_arrays(name, build, enabled=cache)
    if arrays["images"].shape != (indices.size, image_size, image_size, 3) or not np.array_equal(
        arrays["labels"], labels
    ):
        raise DataSourceError(f"CelebA cache file {name} disagrees with the annotations; delete it and rerun")
    return CelebASplit(arrays["images"], arrays["labels"])


# -- model --------------------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus the (projected when the shape changes) input, then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CelebAResNet(nn.Module):
    """ResNet-18-style trunk (``.encoder``, output (N, 32·width)) and ``n_tasks`` one-logit heads (``.heads``).

    Args:
        n_tasks: number of binary attributes (40).
        width: channels of the first stage (64 as in ResNet-18; stages use width, 2·, 4·, 8·width).
        blocks: basic blocks per stage ((2, 2, 2, 2) is ResNet-18).

    ``forward(x)`` with x (N, 3, S, S) returns ``(features, [logit_1 (N,), ..., logit_K (N,)])``.
    """

    def __init__(self, n_tasks: int = 40, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be four counts >= 1, got {tuple(blocks)}")
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            for index in range(count):
                layers.append(_BasicBlock(channels, out_channels, stride=2 if stage > 0 and index == 0 else 1))
                channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        self.encoder: nn.Module = nn.Sequential(*layers)
        self.features = 4 * channels
        self.heads = nn.ModuleList(nn.Linear(self.features, 1) for _ in range(n_tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.encoder(x)
        return features, [head(features).squeeze(-1) for head in self.heads]


# -- losses and metrics -------------------------------------------------------------------------------------------
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


# -- the benchmark -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CelebASettings:
    """What a protocol fixes beyond :class:`TrainingProtocol`: input size, trunk width and evaluation subset."""

    image_size: int
    width: int
    eval_size: int | None


class CelebABenchmark(Benchmark):
    """CelebA's 40 attributes with a ResNet-18-style trunk (see the module docstring); needs ``data_dir``."""

    name: ClassVar[str] = "celeba"
    tasks: ClassVar[tuple[str, ...]] = ATTRIBUTES
    metrics: ClassVar[tuple[Metric, ...]] = tuple(Metric(f"acc/{a}", a, higher_is_better=True) for a in ATTRIBUTES)
    protocols: ClassVar[dict[str, TrainingProtocol]] = {
        "paper": TrainingProtocol(
            name="paper",
            epochs=15,
            batch_size=256,
            lr=3e-4,
            description="official splits, 64×64 inputs, ResNet-18 trunk, Adam 3e-4, batch 256, 15 epochs (FAMO's "
            "schedule)",
        ),
        "quick": TrainingProtocol(
            name="quick",
            epochs=2,
            batch_size=64,
            lr=1e-3,
            description="first 1,024 training and 256 val / test images, 32×32 inputs, ResNet-18 trunk at width 8, "
            "Adam 1e-3, batch 64, 2 epochs (a smoke-scale run: ~0.3 s per EW step on one CPU core)",
            reduced=True,
            train_size=1024,
        ),
    }
    default_protocol: ClassVar[str] = "paper"
    settings: ClassVar[dict[str, CelebASettings]] = {
        "paper": CelebASettings(image_size=64, width=64, eval_size=None),
        "quick": CelebASettings(image_size=32, width=8, eval_size=256),
    }

    def __init__(self, protocol: str | None = None, data_dir: str | None = None, cache: bool = True) -> None:
        super().__init__(protocol, data_dir)
        if data_dir is None:
            raise DataSourceError(
                "CelebA cannot be installed here: download the aligned-and-cropped release (img_align_celeba, "
                f"{ATTR_FILE}, {PARTITION_FILE}) from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and pass "
                "its folder as data_dir"
            )
        self.root = data_dir
        self.setting = self.settings[self.protocol.name]
        self.cache = cache
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}

    def split(self, split: Split) -> tuple[Tensor, Tensor]:
        """(images (N, 3, S, S) uint8, labels (N, 40) float32) of ``split``, loaded once."""
        if split not in self._splits:
            limit = self.protocol.train_size if split == "train" else self.setting.eval_size
            data = load_celeba(self.root, split, self.setting.image_size, limit=limit, cache=self.cache)
            images = torch.from_numpy(np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)))
            self._splits[split] = images, torch.from_numpy(data.labels).float()
        return self._splits[split]

    def loader(
        self, split: Split, *, batch_size: int, shuffle: bool, generator: torch.Generator
    ) -> Iterable[tuple[Tensor, Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images, labels = self.split(split)
        return _Batches(images, labels, batch_size, shuffle, generator)

    def model(self) -> CelebAResNet:
        return CelebAResNet(n_tasks=len(ATTRIBUTES), width=self.setting.width)

    def losses(self, outputs: list[Tensor], targets: Tensor) -> Tensor:
        return attribute_losses(outputs, targets)

    def evaluator(self) -> CelebAEvaluator:
        return CelebAEvaluator()

    def to_device(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        """uint8 images travel as bytes and become float32 in [0, 1] on ``device``."""
        images, labels = batch
        return images.to(device).float().div_(255.0), labels.to(device)


class _Batches:
    """Batches of (uint8 images, labels); a fresh order from ``generator`` each time it is iterated."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool, generator: torch.Generator):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator

    def __len__(self) -> int:
        return -(-self.labels.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.labels.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index]
