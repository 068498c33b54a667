"""CelebA's data: the official aligned-and-cropped release at a user path, parsed, resized and cached.

Data (Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015): 202,599 aligned 178×218 JPEGs, the
40 attributes of each (``list_attr_celeba.txt``: a count line, the attribute names, then ``<file> ±1 × 40``) and
the official partition (``list_eval_partition.txt``: ``<file> 0|1|2`` for train / val / test, 162,770 / 19,867 /
19,962 images). The files may sit directly under ``data_dir`` or in the release's ``Img/``, ``Anno/``, ``Eval/``
folders; ``img_align_celeba_png`` (PNG copies, as Sener & Koltun's loader reads) is accepted too.

Construction as in the MTL papers (Sener & Koltun, NeurIPS 2018, arXiv 1810.04650; FAMO, Liu et al., NeurIPS
2023, arXiv 2306.03792): the whole image resized to 64×64 with Pillow's bilinear (antialiased) filter — the
aspect ratio is not kept, as with torchvision's ``Resize((64, 64))`` in FAMO's loader — RGB scaled to [0, 1]; −1
becomes 0. Resized images are decoded once (Pillow, in threads) and cached as uint8 arrays
(:mod:`taskbalance.benchmarks.datasets.cache`), keyed by the data path, the contents of the two text files, the
image size and the subset, so a changed annotation file rebuilds the cache (a changed image under an unchanged
name does not).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from .cache import cached_arrays
from .mnist import DataSourceError

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
