"""Timing steps fairly on a shared machine, and the peak memory of one step.

Steps are timed round-robin (one of each in turn, repeated), so that a slow spell of a shared machine hits every
step alike, and the median is reported. The order is shuffled every round (seeded): a step that runs right after
a memory-hungry one pays for the pages the allocator gave back, and no step should always be the one that pays.
On the CPU with one torch thread the clock is the process's CPU time, which another job on the machine does not
inflate the way it inflates wall time; with more threads it is wall time (CPU time would add up the threads'
work, charging a step for the parallelism that makes it faster); on CUDA it is wall time between
synchronisations.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Step = Callable[[], None]


T = TypeVar("T")


def uses_wall_time(device: torch.device) -> bool:
    """Whether steps on ``device`` are timed by the wall clock: on CUDA, and on the CPU with several threads."""
    return device.type == "cuda" or torch.get_num_threads() > 1


def timed_call(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """(fn(), its milliseconds): see :func:`uses_wall_time`; on CUDA between synchronisations."""
    cuda = device.type == "cuda"
    clock = time.perf_counter if uses_wall_time(device) else time.process_time
    if cuda:
        torch.cuda.synchronize(device)
    start = clock()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return result, 1e3 * (clock() - start)


def measure(
    steps: dict[str, Step], repeats: int, device: torch.device, warmup: int = 3, min_call_ms: float = 0.0
) -> dict[str, list[float]]:
    """Milliseconds per call of every step over ``repeats`` rounds, after ``warmup`` untimed rounds.

    With ``min_call_ms``, a step faster than that is run several times in a row per timed call (as many as reach
    it, from its last warm-up time) and the call's time divided by that count: cheap steps then get the same
    clock resolution and the same share of a slow spell as expensive ones.
    """

    def timed(step: Step, count: int) -> float:
        def run() -> None:
            for _ in range(count):
                step()

        return timed_call(run, device)[1] / count

    inner = dict.fromkeys(steps, 1)
    for _ in range(warmup):
        for name, step in steps.items():
            elapsed = timed(step, 1)
            inner[name] = max(1, min(50, math.ceil(min_call_ms / max(elapsed, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            times[name].append(timed(steps[name], inner[name]))
    return times


class PeakMemory(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it untyped
    """Peak bytes of the tensor storages created inside the context and alive at the same time (any device).

    Every operator's outputs are recorded by their storage; a storage counts from its first appearance until it
    is freed (its weak reference expires). Memory that existed before the context (parameters, the batch) is
    not counted: the result is what one step needs on top of the model, comparable across methods.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())  # type: ignore[no-untyped-call]
                    self.current += storage.nbytes()
        self._release()
        self.peak = max(self.peak, self.current)
        return out

    def _release(self) -> None:
        dead = [key for key, (ref, _) in self.live.items() if ref.expired()]  # type: ignore[no-untyped-call]
        for key in dead:
            self.current -= self.live.pop(key)[1]


def peak_memory_mb(step: Step, device: torch.device) -> float:
    """MiB one call of ``step`` needs beyond what was allocated before it (CUDA: the allocator's own peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before) / 2**20
    with PeakMemory() as tracker:
        step()
    return float(tracker.peak) / 2**20
