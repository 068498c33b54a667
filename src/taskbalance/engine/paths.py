"""The engine's paths by name, and what ``"auto"`` picks among them (described in :mod:`taskbalance.engine`)."""

from __future__ import annotations

from typing import Literal

import torch

EnginePath = Literal["auto", "heuristic", "loop", "batched", "features", "features_loop", "gramian", "representation"]
ENGINE_PATHS: tuple[str, ...] = (
    "auto",
    "heuristic",
    "loop",
    "batched",
    "features",
    "features_loop",
    "gramian",
    "representation",
)
#: the paths that read the feature cut (whether every shared path runs through ``features``)
CUT_PATHS: tuple[str, ...] = ("auto", "heuristic", "features", "features_loop", "gramian", "representation")
#: the paths that exist only through ``features``, and refuse a cut that is not exact
FEATURE_PATHS: tuple[str, ...] = ("features", "features_loop", "representation")
#: the exact paths that hold J (K × P), by whether the K products go through vmap
VMAP_PATHS: tuple[str, ...] = ("batched", "features")
#: the exact paths ``"auto"`` chooses among
TIMED_PATHS: tuple[str, ...] = ("features_loop", "features", "loop", "batched", "gramian")

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


def resolve_rule(exact: bool, device: torch.device, jacobian_bytes: int = 0, reads_gramian: bool = False) -> EnginePath:
    """The exact path ``"heuristic"`` takes, and ``"auto"``'s incumbent (:mod:`~taskbalance.engine.tuning`).

    Features-first whenever it is exact: it runs the heads about once instead of K times. The K products through
    the trunk (or the whole graph when features-first is not exact) go through vmap on accelerators, where one
    batched kernel beats K launches, and one task at a time on the CPU, where vmap on one thread gains nothing and
    its convolution rules (grouped convolutions) cost more than K plain backward calls. A method that reads only G
    gets the Gramian path, which never holds J, when J (``jacobian_bytes``) would take more than
    :data:`JACOBIAN_MEMORY_SHARE` of the available memory: one more trunk backward instead of running out of memory.
    """
    vmap = device.type != "cpu"
    if reads_gramian and needs_gramian_path(device, jacobian_bytes):
        return "gramian"
    if exact:
        return "features" if vmap else "features_loop"
    return "batched" if vmap else "loop"


def needs_gramian_path(device: torch.device, jacobian_bytes: int) -> bool:
    """Whether J would take more than :data:`JACOBIAN_MEMORY_SHARE` of the memory available on ``device``."""
    if jacobian_bytes <= 2**28:  # below 256 MB J is never the problem: skip the query
        return False
    available = available_memory(device)
    return available is not None and jacobian_bytes > JACOBIAN_MEMORY_SHARE * available


def candidates(exact: bool, gramian: bool, vmap_failed: bool) -> list[EnginePath]:
    """The exact paths ``"auto"`` times: features-first (trunk looped or under vmap) when the cut is exact, the
    whole graph looped or under vmap, and the Gramian path for a method that reads only G (``gramian``). Paths
    through vmap are left out once vmap failed on the model."""
    found: list[EnginePath] = ["features_loop", "features"] if exact else []
    found += ["loop", "batched"]
    if gramian:
        found.append("gramian")
    return [p for p in found if not (vmap_failed and p in VMAP_PATHS)]
