"""Checksum-verified download of the official MNIST and Fashion-MNIST IDX files, for machines that are online.

This is the last-resort source of :mod:`taskbalance.benchmarks.mnist` (after the installed packages and a user
path) and runs only when the user allows it: ``download=True`` or ``TASKBALANCE_DOWNLOAD=1``.

Each file is streamed into a temporary file next to its final place in the cache
(``<cache>/downloads/<dataset>/``) while its MD5 is computed; it is moved into place only when the byte count
matches the server's ``Content-Length`` and the MD5 matches the official one. Anything else (a network error, a
transfer cut short, a corrupt file) removes the temporary file, so the cache never holds a half-written or
unverified file. Mirrors are tried in order; when all fail the error lists every attempt (for a corrupt file: the
file name, the expected and the actual checksum). The checksums are MD5 because that is what the publishers
list (torchvision's MNIST resources; Fashion-MNIST's README): here they guard integrity, not security.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .cache import atomic_open, cache_dir
from .mnist import DataSourceError

ENV_VAR = "TASKBALANCE_DOWNLOAD"
_TRUE = {"1", "true", "yes", "on"}
#: files at least this large get a progress bar (when ``progress`` is left to decide)
PROGRESS_MIN_BYTES = 1 << 20
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Resource:
    """One official file: its name on the mirrors and its published MD5."""

    filename: str
    md5: str


#: official files per dataset, with the publishers' MD5 checksums of the ``.gz`` files
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": (
        Resource("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        Resource("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        Resource("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        Resource("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "fashion": (
        Resource("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        Resource("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        Resource("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        Resource("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
}
#: base URLs tried in order (yann.lecun.com often refuses automated downloads, so it comes last)
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}
_PREFIX = {"train": "train", "test": "t10k"}


class DownloadError(DataSourceError):
    """No mirror delivered a verified file; the message lists each attempt and what went wrong."""


class _AttemptFailed(Exception):
    """One mirror failed (network, short transfer or checksum); the next mirror is tried."""


def download_allowed(download: bool | None = None) -> bool:
    """``download`` when given, else whether ``$TASKBALANCE_DOWNLOAD`` is set to 1 / true / yes / on."""
    if download is not None:
        return download
    return os.environ.get(ENV_VAR, "").strip().lower() in _TRUE


def md5_of(path: str | os.PathLike[str]) -> str:
    """The hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    urls: Sequence[str],
    target: str | os.PathLike[str],
    md5: str,
    *,
    timeout: float = 30.0,
    progress: bool | None = None,
) -> Path:
    """Fetch the first of ``urls`` that delivers a file with checksum ``md5`` to ``target``; return ``target``.

    ``progress=None`` shows a tqdm bar for files of at least :data:`PROGRESS_MIN_BYTES`. A ``target`` that
    already exists with the right checksum is kept without a download; one with a wrong checksum is replaced.

    Raises:
        DownloadError: every URL failed; the message names the file and each URL's failure.
    """
    target = Path(target)
    if not urls:
        raise ValueError("urls must name at least one mirror")
    if target.is_file():
        if md5_of(target) == md5:
            return target
        target.unlink()
    failures = []
    for url in urls:
        try:
            _fetch(url, target, md5, timeout=timeout, progress=progress)
            return target
        except _AttemptFailed as error:
            failures.append(f"  {url}: {error}")
    raise DownloadError(
        f"could not download {target.name} into {target.parent}; tried {len(urls)} mirror(s):\n" + "\n".join(failures)
    )


def _fetch(url: str, target: Path, md5: str, *, timeout: float, progress: bool | None) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "taskbalance (urllib)"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, atomic_open(target) as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            show = expected is not None and expected >= PROGRESS_MIN_BYTES if progress is None else progress
            digest = hashlib.md5(usedforsecurity=False)
            received = 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=target.name, disable=not show) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # urllib ends a body cut short by a closed connection without an error: compare with the header
            if expected is not None and received != expected:
                raise _AttemptFailed(f"transfer interrupted after {received} of {expected} bytes")
            actual = digest.hexdigest()
            if actual != md5:
                raise _AttemptFailed(f"checksum mismatch for {target.name}: expected md5 {md5}, got {actual}")
    except urllib.error.HTTPError as error:
        raise _AttemptFailed(f"HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise _AttemptFailed(f"cannot connect ({error.reason})") from error
    except (http.client.HTTPException, OSError) as error:  # resets, timeouts, IncompleteRead mid-body
        raise _AttemptFailed(f"transfer failed ({type(error).__name__}: {error})") from error


def download_dir(name: str) -> Path:
    """Where the official files of ``name`` (``mnist`` / ``fashion``) are cached: ``<cache>/downloads/<name>``."""
    return cache_dir() / "downloads" / name


def download_split(
    name: str, split: str, *, timeout: float = 30.0, progress: bool | None = None, directory: Path | None = None
) -> Path:
    """Download (or find, verified, in the cache) the images and labels of one split; return their directory.

    The directory then holds the standard IDX file names that :func:`taskbalance.benchmarks.mnist.load_idx_split`
    reads.
    """
    if name not in RESOURCES:
        raise ValueError(f"dataset must be one of {', '.join(sorted(RESOURCES))}, got {name!r}")
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = download_dir(name) if directory is None else directory
    for resource in RESOURCES[name]:
        if resource.filename.startswith(_PREFIX[split] + "-"):
            urls = [base + resource.filename for base in MIRRORS[name]]
            download_file(urls, directory / resource.filename, resource.md5, timeout=timeout, progress=progress)
    return directory
