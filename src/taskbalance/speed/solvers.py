"""Solver times at any task count: the ``solve ms`` of the speed tables, from a synthetic Gramian, for the K that the
four timed models do not cover (the target: ≤ 1 ms at K ≤ 10, ≤ 10 ms above).

    taskbalance bench solvers [--tasks 2,3,5,10] [--methods mgda,imgrad] [--repeats 50] [--threads 1]

Each method that reads G is called as the engine calls it (``GradientBalancer.__call__``: under inference mode,
the weights cloned out) on a sequence of Gramians G_t = J_t J_tᵀ of K gradients that share a direction and drift
from step to step (J_t = U + 0.05·N_t, U = 0.3 + N(0, 1), P = 2000 coordinates, float32 as the engine forms G),
so that warm starts help as they do in training. The median over ``repeats`` calls after ``WARMUP`` untimed ones:
process CPU time at 1 thread, the wall clock at more (:func:`~.timing.timed_call`). These are solves alone, with
a warm cache; inside a training step the same solve measures ~10-25% more.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import registry
from .report import SOLVER_TARGET, solver_bound
from .timing import timed_call, uses_wall_time

#: untimed calls first: warm starts, lazily built state, the first dispatch of each kernel
WARMUP = 10
#: coordinates per synthetic gradient (G's cost does not depend on it; its conditioning does, slightly)
COORDINATES = 2000


def gramian_sequence(n_tasks: int, steps: int, seed: int = 0) -> list[Tensor]:
    """``steps`` Gramians of ``n_tasks`` correlated gradients drifting from step to step (see the module doc)."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(n_tasks, COORDINATES, generator=gen) + 0.3
    out = []
    for _ in range(steps):
        jacobian = shared + 0.05 * torch.randn(n_tasks, COORDINATES, generator=gen)
        out.append(jacobian @ jacobian.T)
    return out


def gramian_methods() -> list[str]:
    """Every registered gradient method that reads G, at its defaults."""
    return [name for name in registry.available() if registry.make(name, n_tasks=2).gradient.needs == "gramian"]


def check_methods(specs: Sequence[str]) -> list[str]:
    """The names to time: each a registered gradient method that reads G (``ValueError`` otherwise, or for none)."""
    names = [s.strip().lower() for s in specs if s.strip()]
    readers = gramian_methods()
    if not names:
        raise ValueError(f"no methods given; choose from {', '.join(readers)}")
    unknown = [n for n in names if n not in readers]
    if unknown:
        raise ValueError(
            f"bench solvers times methods that solve from G, not {', '.join(unknown)}; choose from {', '.join(readers)}"
        )
    return names


def solve_ms(name: str, n_tasks: int, repeats: int, seed: int = 0) -> float:
    """Median ms of one solve of ``name`` at K = ``n_tasks`` over ``repeats`` calls (after :data:`WARMUP`)."""
    method = registry.make(name, n_tasks=n_tasks).gradient
    gramians = gramian_sequence(n_tasks, WARMUP + repeats, seed)
    losses = torch.ones(n_tasks)
    device = torch.device("cpu")
    times = []
    for i, gramian in enumerate(gramians):
        _, ms = timed_call(functools.partial(method, gramian, losses), device)
        if i >= WARMUP:
            times.append(ms)
    return statistics.median(times)


def solver_table(times: dict[str, dict[int, float]], task_counts: Sequence[int]) -> str:
    """The markdown table (a row per method, a column per K, misses of the target in bold) and the target's line."""
    lines = [
        "| method | " + " | ".join(f"K = {k}" for k in task_counts) + " |",
        "|---|" + "---:|" * len(task_counts),
    ]
    misses = []
    for name, row in times.items():
        cells = []
        for k in task_counts:
            over = row[k] > solver_bound(k)
            cells.append(f"**{row[k]:.3f}**" if over else f"{row[k]:.3f}")
            if over:
                misses.append(f"{name} at K = {k}: {row[k]:.2f} ms")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    verdict = "holds" if not misses else "misses: " + "; ".join(misses)
    lines += ["", f"Target, {SOLVER_TARGET}: {verdict}."]
    return "\n".join(lines)


def run(task_counts: Sequence[int], methods: Sequence[str] | None, repeats: int, threads: int | None = None) -> str:
    """Time every method (default: all that read G) at every K; the table, headed by what was measured."""
    names = gramian_methods() if methods is None else check_methods(methods)
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        count = torch.get_num_threads()
        wall = uses_wall_time(torch.device("cpu"))
        times = {name: {k: solve_ms(name, k, repeats) for k in task_counts} for name in names}
    finally:
        torch.set_num_threads(before)
    clock = "wall clock" if wall else "process CPU time"
    head = (
        f"Solver ms per call from a synthetic G (torch {torch.__version__}, cpu, {count} thread(s), {clock}; median "
        f"of {repeats} after {WARMUP} warm-up calls)"
    )
    return head + "\n\n" + solver_table(times, task_counts)
