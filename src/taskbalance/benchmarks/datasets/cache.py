"""Where derived data (parsed MNIST, constructed MultiMNIST, ...) is cached, and how it is written.

The cache lives outside the repository: ``$TASKBALANCE_CACHE`` when set, else ``~/.cache/taskbalance``. Every
file is written to a temporary file in the same directory and moved into place with :func:`os.replace`, so a
crash or an exception mid-write never leaves a half-written file under the final name (a reader sees either the
old file, the new one, or none).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ENV_VAR = "TASKBALANCE_CACHE"


def cache_dir() -> Path:
    """The cache directory (created if missing): ``$TASKBALANCE_CACHE`` or ``~/.cache/taskbalance``."""
    root = os.environ.get(ENV_VAR)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "taskbalance"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at ``path`` only once the ``with`` block completes.

    On an exception inside the block the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def save_arrays(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` atomically."""
    named: dict[str, Any] = dict(arrays)  # numpy's stub mixes array names with its allow_pickle flag
    with atomic_open(path) as handle:
        np.savez(handle, allow_pickle=False, **named)


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an ``.npz`` written by :func:`save_arrays` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]], enabled: bool = True) -> dict[str, np.ndarray]:
    """The arrays cached as ``<cache_dir>/<name>``, built with ``build()`` and saved on a miss.

    A cache file that cannot be read (truncated by a disk-full, or from an incompatible version) is rebuilt
    rather than trusted. With ``enabled=False`` the cache is neither read nor written.
    """
    if not enabled:
        return build()
    path = cache_dir() / name
    if path.exists():
        try:
            return load_arrays(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass
    arrays = build()
    save_arrays(path, arrays)
    return arrays
