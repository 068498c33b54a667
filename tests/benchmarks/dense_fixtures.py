"""Tiny NYUv2 / Cityscapes releases written in MTAN's exact ``.npy`` layout (never downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _normals(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) unit normals, with a missing (all-zero) block in the top-left corner."""
    vectors = rng.normal(size=(height, width, 3))
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    vectors[:4, :4] = 0.0
    return vectors


def _depth(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 1) depths in [0.5, 10), with missing (zero) pixels along the bottom row."""
    depth = rng.uniform(0.5, 10.0, size=(height, width, 1))
    depth[-1] = 0.0
    return depth


def _labels(rng: np.random.Generator, height: int, width: int, n_classes: int, dtype: type) -> np.ndarray:
    """(H, W) labels in 0 … n_classes − 1 with an unlabelled (−1) left column."""
    labels: np.ndarray = rng.integers(0, n_classes, size=(height, width)).astype(dtype)
    labels[:, 0] = -1
    return labels


def write_release(
    root: Path,
    modalities: Sequence[str],
    sizes: dict[str, int],
    height: int,
    width: int,
    classes: dict[str, int],
    seed: int = 0,
    label_dtype: type = np.float64,
) -> Path:
    """Write ``root/<split>/<modality>/<i>.npy`` for each split in ``sizes``; ``classes`` maps label folders to
    their class counts. Images are float64 RGB in [0, 1], channels last, as in the release."""
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        for modality in modalities:
            (root / split / modality).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            for modality in modalities:
                if modality == "image":
                    array = rng.uniform(0.0, 1.0, size=(height, width, 3))
                elif modality == "depth":
                    array = _depth(rng, height, width)
                elif modality == "normal":
                    array = _normals(rng, height, width)
                else:
                    array = _labels(rng, height, width, classes[modality], label_dtype)
                np.save(root / split / modality / f"{i}.npy", array)
    return root


def write_nyuv2(
    root: Path, n_train: int = 9, n_val: int = 3, height: int = 288, width: int = 384, label_dtype: type = np.float64
) -> Path:
    """An NYUv2 release (13 classes) at the real 288×384 unless told otherwise."""
    modalities = ("image", "label", "depth", "normal")
    sizes = {"train": n_train, "val": n_val}
    return write_release(root, modalities, sizes, height, width, {"label": 13}, label_dtype=label_dtype)


def write_cityscapes(
    root: Path, n_train: int = 9, n_val: int = 3, label_folders: Sequence[str] = ("label_7", "label_19")
) -> Path:
    """A Cityscapes release at the real 128×256; ``label_folders`` from label_7, label_19 and LibMTL's label."""
    classes = {"label_7": 7, "label_19": 19, "label": 7}
    modalities = ("image", *label_folders, "depth")
    sizes = {"train": n_train, "val": n_val}
    return write_release(root, modalities, sizes, 128, 256, {k: classes[k] for k in label_folders})
