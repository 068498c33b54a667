"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST): two overlapping 28×28 images, one task per image.

Construction (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
arXiv 1810.04650): every image of a split gets one partner drawn uniformly at random from the same split (with
replacement, as the reference code does). On a 36×36 canvas the image goes to rows/columns [0:28] and its partner
to [6:34]; where they overlap the pixel-wise maximum is kept. The canvas is resized to 28×28 by nearest
neighbour, sampling source pixel ⌊(i + ½)·36/28⌋ (PIL's NEAREST rule, which the reference code calls). Labels
are (left, right) = (image, partner). Inputs are normalised with MNIST's mean 0.1307 and std 0.3081.

- ``multimnist``: MNIST with MNIST; ``multifashion``: Fashion-MNIST with Fashion-MNIST;
  ``multifashion_mnist``: a Fashion-MNIST item on the left, an MNIST digit on the right.
- Splits: ``test`` pairs the 10k official test images; ``train`` / ``val`` first split the 60k official training
  images (seeded), then pair within each part, so no source image appears in both (the reference pairs over all
  of train and carves validation out afterwards, which lets validation share source digits with training).

Deliberate differences: ParetoMTL's released Multi-(Fashion+MNIST) pickles have 36×36 inputs and 120k/20k
samples from a construction not published in code; ours uses the same 28×28 rule as the other two and 60k/10k,
so the three are comparable. Everything is vectorised (60k samples in well under a second once the raw data is
loaded) and cached by (dataset, seed, validation size, split).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .cache import cached_arrays
from .mnist import Digits, Name, load_digits

DatasetName = Literal["multimnist", "multifashion", "multifashion_mnist"]
SplitName = Literal["train", "val", "test"]

#: (left source, right source) of each dataset
SOURCES: dict[str, tuple[Name, Name]] = {
    "multimnist": ("mnist", "mnist"),
    "multifashion": ("fashion", "fashion"),
    "multifashion_mnist": ("fashion", "mnist"),
}
MEAN, STD = 0.1307, 0.3081
SIDE, CANVAS, SHIFT = 28, 36, 6
#: rows / columns of the 36×36 canvas that nearest-neighbour resizing to 28×28 keeps
NEAREST = (2 * np.arange(SIDE) + 1) * CANVAS // (2 * SIDE)
_STREAM = {"split": 0, "train": 1, "val": 2, "test": 3}
_CACHE_VERSION = 1


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The standard composite of two stacks of 28×28 uint8 images, shape (N, 28, 28) each → (N, 28, 28) uint8."""
    if left.shape != right.shape or left.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"left and right must both have shape (N, 28, 28), got {left.shape} and {right.shape}")
    canvas = np.zeros((left.shape[0], CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :SIDE, :SIDE] = left
    window = canvas[:, SHIFT : SHIFT + SIDE, SHIFT : SHIFT + SIDE]
    np.maximum(window, right, out=window)
    return canvas[:, NEAREST][:, :, NEAREST]


@dataclass
class MultiMNIST(Dataset[tuple[Tensor, Tensor]]):
    """One split of a two-task MultiMNIST-style dataset.

    Attributes:
        images: (N, 28, 28) uint8 composites (not normalised).
        labels: (N, 2) int64, column 0 the left task, column 1 the right task.
        sources: (N, 2) int64, indices of the left / right source images in the official split they come from.
        name: the dataset (``multimnist``, ``multifashion``, ``multifashion_mnist``).
        split: ``train``, ``val`` or ``test``.

    Indexing gives ``(x, y)`` with x (1, 28, 28) float32 normalised and y (2,) int64; :meth:`tensors` gives the
    whole split at once (faster than a DataLoader for a model this small).
    """

    images: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    name: str = "multimnist"
    split: str = "train"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(self.images[index].astype(np.float32)).unsqueeze(0)
        return (x / 255.0 - MEAN) / STD, torch.from_numpy(self.labels[index].copy())

    def tensors(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """All inputs (N, 1, 28, 28) normalised, and labels (N, 2), on ``device``."""
        x = torch.from_numpy(self.images).to(device=device).unsqueeze(1).to(dtype)
        return (x / 255.0 - MEAN) / STD, torch.from_numpy(self.labels).to(device=device)

    def subset(self, n: int) -> MultiMNIST:
        """The first ``n`` samples (a random subset: the construction already shuffled the sources)."""
        if not 0 < n <= len(self):
            raise ValueError(f"subset size must be in 1..{len(self)}, got {n}")
        return MultiMNIST(self.images[:n], self.labels[:n], self.sources[:n], self.name, self.split)


def construct(left: Digits, right: Digits, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair every ``left`` image with a random ``right`` one: (images, labels (N, 2), partner indices (N,))."""
    if len(left.images) == 0 or len(right.images) == 0:
        raise ValueError("cannot construct from an empty split")
    partners = rng.integers(0, len(right.images), size=len(left.images))
    images = overlay(left.images, right.images[partners])
    labels = np.stack([left.labels, right.labels[partners]], axis=1).astype(np.int64)
    return images, labels, partners


def split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indices, validation indices) of ``n`` training images; disjoint, covering all ``n``."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in 0..{n - 1}, got {val_size}")
    order = _rng(seed, "split").permutation(n)
    return order[val_size:], order[:val_size]


def build_split(
    left: Digits, right: Digits, split: SplitName, seed: int, val_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, sources) of ``split`` from the raw official split(s) ``left`` / ``right``.

    For ``train`` / ``val`` the raw data is the official training split (both sides the same length); for
    ``test`` the official test split.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if len(left.images) != len(right.images):
        raise ValueError(f"left and right sources differ in size: {len(left.images)} vs {len(right.images)}")
    if split == "test":
        indices = np.arange(len(left.images))
    else:
        train, val = split_train_val(len(left.images), val_size, seed)
        indices = train if split == "train" else val
        if indices.size == 0:
            raise ValueError("the validation split is empty: use val_size > 0")
    part_left = Digits(left.images[indices], left.labels[indices])
    part_right = Digits(right.images[indices], right.labels[indices])
    images, labels, partners = construct(part_left, part_right, _rng(seed, split))
    sources = np.stack([indices, indices[partners]], axis=1).astype(np.int64)
    return images, labels, sources


def load_multimnist(
    dataset: DatasetName = "multimnist",
    split: SplitName = "train",
    *,
    seed: int = 0,
    val_size: int = 10_000,
    mnist_path: str | Path | None = None,
    fashion_path: str | Path | None = None,
    cache: bool = True,
) -> MultiMNIST:
    """One split of ``dataset``, constructed from the installed raw data (see :mod:`taskbalance.benchmarks.mnist`)
    or from IDX files at ``mnist_path`` / ``fashion_path``, and cached.

    Args:
        dataset: ``multimnist``, ``multifashion`` or ``multifashion_mnist``.
        split: ``train`` (60,000 − val_size), ``val`` (val_size) or ``test`` (10,000).
        seed: seeds the train/validation split and the pairing.
        val_size: training images held out for validation (default 10,000, the size of the test split).
    """
    if dataset not in SOURCES:
        raise ValueError(f"dataset must be one of {', '.join(SOURCES)}, got {dataset!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    paths: dict[str, str | Path | None] = {"mnist": mnist_path, "fashion": fashion_path}
    left_name, right_name = SOURCES[dataset]
    raw_split: Literal["train", "test"] = "test" if split == "test" else "train"

    def build() -> dict[str, np.ndarray]:
        left = load_digits(left_name, raw_split, paths[left_name], cache=cache)
        right = left if right_name == left_name else load_digits(right_name, raw_split, paths[right_name], cache=cache)
        images, labels, sources = build_split(left, right, split, seed, val_size)
        return {"images": images, "labels": labels, "sources": sources}

    used = sorted(
        str(Path(p).expanduser().resolve()) for n, p in paths.items() if p is not None and n in SOURCES[dataset]
    )
    origin = "" if not used else "-" + hashlib.sha1("|".join(used).encode()).hexdigest()[:10]
    held_out = "" if split == "test" else f"-val{val_size}"
    key = f"{dataset}-seed{seed}{held_out}-{split}{origin}-v{_CACHE_VERSION}.npz"
    arrays = cached_arrays(key, build, enabled=cache)
    return MultiMNIST(arrays["images"], arrays["labels"], arrays["sources"], dataset, split)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per (seed, purpose), so each split is reproducible on its own."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM[stream]]))
