"""The engine's paths by name, and what ``"auto"`` picks among them (described in :mod:`taskbalance.engine`)."""

from __future__ import annotations

from typing import Literal

import torch

EnginePath = Literal["auto", "loop", "batched", "features", "gramian", "representation"]
ENGINE_PATHS: tuple[str, ...] = ("auto", "loop", "batched", "features", "gramian", "representation")
#: the paths that read the feature cut (whether every shared path runs through ``features``)
CUT_PATHS: tuple[str, ...] = ("auto", "features", "gramian", "representation")
#: the paths that exist only through ``features``, and refuse a cut that is not exact
FEATURE_PATHS: tuple[str, ...] = ("features", "representation")

#: "auto" keeps J only while it takes at most this share of the memory available on its device
JACOBIAN_MEMORY_SHARE = 0.5


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: the driver's free memory; CPU: Linux MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def resolve_auto(
    exact: bool, device: torch.device, jacobian_bytes: int = 0, reads_gramian: bool = False
) -> tuple[EnginePath, bool]:
    """What ``"auto"`` runs: (path, whether the K products through the trunk go through vmap).

    Features-first whenever it is exact: it runs the heads about once instead of K times. The K products through
    the trunk (or the whole graph when features-first is not exact) go through vmap on accelerators, where one
    batched kernel beats K launches, and one task at a time on the CPU, where vmap gains nothing and its
    convolution rules (grouped convolutions) cost more than K plain backward calls (the ``engine ... (w = 1)``
    rows of ``taskbalance bench speed``). A method that reads only G gets the Gramian path, which never holds J,
    when J (``jacobian_bytes``) would take more than :data:`JACOBIAN_MEMORY_SHARE` of the available memory: one
    more trunk backward instead of running out of memory.
    """
    vmap = device.type != "cpu"
    if reads_gramian and jacobian_bytes > 2**28:  # below 256 MB J is never the problem: skip the query
        available = available_memory(device)
        if available is not None and jacobian_bytes > JACOBIAN_MEMORY_SHARE * available:
            return "gramian", vmap
    if exact:
        return "features", vmap
    return ("batched" if vmap else "loop"), vmap
