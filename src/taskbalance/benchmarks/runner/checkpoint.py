"""Run checkpoints: written atomically at the end of every epoch, verified and read back with ``weights_only=True``.

torch's checkpoint is a zip archive with a CRC-32 per record; ``torch.load`` does not check them, so a checkpoint
whose bytes were damaged on disk would resume silently into another run. :func:`load_checkpoint` checks every
record's CRC first and refuses a damaged file with one line.

A checkpoint holds everything a run needs to continue as if it had never stopped: the model, optimizer,
scheduler and balancer states, torch's global RNG state (dropout; CUDA's too on a GPU), the state of the
generator that orders the training batches, the global step and the per-epoch history. Only tensors, numbers,
strings, lists, dicts and None go in, so loading never unpickles code.
"""

from __future__ import annotations

import io
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ..datasets.cache import atomic_open

FORMAT = 1
_REQUIRED = ("format", "epoch", "step", "model", "optimizer", "rng", "order", "history")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and how to get going again."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a crash leaves the previous checkpoint in place)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    with atomic_open(path) as handle:
        handle.write(buffer.getbuffer())


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, tensors mapped to ``device``.

    Raises:
        CheckpointError: unreadable, truncated, of another format version, or missing entries.
    """
    fix = f"delete {path} (the run then restarts from its first epoch) and run again with --resume"
    try:
        data = path.read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({error}); {fix}") from error
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (record {damaged} fails its CRC check); {fix}")
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({error}); {fix}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has format {found!r}, this version writes {FORMAT}; {fix}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; {fix}")
    return state


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's global RNG state, and the CUDA device's when ``device`` is a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rng_state` (RNG states must be CPU byte tensors whatever the map location)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
