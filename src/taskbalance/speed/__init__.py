"""The speed benchmark: median ms per training step of every method on four models, against EW, the cost floor
and torchjd, measured in the same run; peak memory per step; and whether the speed targets hold.

    taskbalance bench speed [--cases multilenet,cnn,qm9,mlp40] [--methods nashmtl,upgrad] [--repeats 11]
                            [--device cpu] [--threads N | --threads 1,2] [--no-torchjd] [--out speed.md]

Columns: ``× EW`` divides by an EW step (one ordinary backward); ``× floor`` by the cheapest exact computation of
the K per-task gradients measured here (plain autograd, one call per task or one batched call, and the engine's
exact paths with w = 1), the least any exact gradient method can cost; ``× torchjd`` by torchjd's implementation
of the same aggregator; ``solve ms`` the median time of the method's own computation from G or J (its solver);
``peak MiB`` the memory one step allocates beyond the model and batch; with several thread counts, ``speed-up`` is
a row's time at the first count over its time at this one. Above each table: what ``engine="auto"`` chose on
the model, from which times. See docs/cost-model.md for what each method costs and why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..benchmarks.extras import require
from ..benchmarks.runner.compare import check_methods as check_specs
from ..benchmarks.runner.compare import resolve_device
from . import torchjd_steps
from .cases import CASE_NAMES, build
from .report import Row, auto_note, case_table, solve_median, targets, targets_table
from .steps import auto_trial, entries, timed_specs
from .timing import measure, peak_memory_mb, uses_wall_time

__all__ = ["CASE_NAMES", "check_cases", "check_methods", "check_writable", "run", "run_case"]

#: cheap steps are run back to back up to this many ms per timed call (noise of a shared CPU is per call)
MIN_CALL_MS = 200.0

NOTES = """Notes:
- floor: the fastest of the `floor` rows, measured in the same run; a method below 1.00 is within noise of it.
  `engine auto (w = 1)` is the path `engine="auto"` chose on the case (its trial is the line above each table);
  every method on `auto` starts from that choice.
- famo: its `after_step` forward under the updated model (part of FAMO's definition) is in its step.
- igbv2: timed over its SAC period (50 steps) at a full replay buffer (capacity 128 so that it fills during the
  warm-up; update count and minibatch as at any full buffer): one SAC update per step on average.
- solve ms: the method's own computation from G (or, marked J, from J: O(K·P) elementwise work, no small problem).
- peak MiB: memory one step allocates beyond the model and batch (CPU: tensor storages alive at once).
"""


def check_cases(cases: Iterable[str]) -> list[str]:
    """The case names, each one of :data:`CASE_NAMES` (``ValueError`` otherwise, and for none at all)."""
    names = [c.strip() for c in cases if c.strip()]
    if not names:
        raise ValueError(f"no cases given; choose from {', '.join(CASE_NAMES)}")
    unknown = [c for c in names if c not in CASE_NAMES]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASE_NAMES)}")
    return names


def check_methods(specs: Iterable[str]) -> set[str]:
    """The specs to time, as registered names; ``ValueError`` for an empty list, a spec the registry refuses
    (unknown name, bad option: its own message) or one the benchmark does not time (each method at its defaults)."""
    chosen = check_specs(list(specs), n_tasks=2)
    timed = timed_specs()
    untimed = [spec for spec in chosen if spec.lower() not in timed]
    if untimed:
        raise ValueError(
            f"the speed benchmark times each registered method at its defaults, not {', '.join(untimed)}; "
            f"choose from {', '.join(timed)}"
        )
    return {spec.lower() for spec in chosen}


def check_writable(path: Path) -> None:
    """``OSError`` unless ``path`` can be written (its folder is created and the file opened for appending); a file
    this probe created is removed again."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        where = f" ({error.filename})" if error.filename not in (None, str(path)) else ""
        raise OSError(f"cannot write {path}: {error.strerror or error}{where}") from error
    if not existed:
        path.unlink()


def run_case(
    name: str, device: torch.device, repeats: int, with_torchjd: bool, methods: set[str] | None = None
) -> tuple[str, list[Row]]:
    """Time every entry of one case round-robin: (the case's description, one row per entry)."""
    case = build(name, device)
    auto = auto_trial(case, device)
    timed = entries(case, device, with_torchjd, methods, auto)
    times = measure({e.name: e.step for e in timed}, repeats, device, warmup=1, min_call_ms=MIN_CALL_MS)
    ms = {e.name: statistics.median(times[e.name]) / e.period for e in timed}
    floor = min(ms[e.name] for e in timed if e.kind == "floor")
    rows = []
    for e in timed:
        peak = peak_memory_mb(e.step, device) if e.period == 1 else math.nan
        rows.append(
            Row(
                case=name,
                n_tasks=case.n_tasks,
                name=e.name,
                kind=e.kind,
                ms=ms[e.name],
                vs_ew=ms[e.name] / ms["ew"],
                vs_floor=ms[e.name] / floor,
                vs_torchjd=ms[e.name] / ms[e.torchjd] if e.torchjd in ms else math.nan,
                solve_ms=solve_median(e.solve_ms),
                reads_gramian=e.reads_gramian,
                peak_mb=peak,
            )
        )
    return f"{case.description}\n\n{auto_note(auto)}", rows


def run(
    cases: Iterable[str],
    device: str | torch.device,
    repeats: int,
    with_torchjd: bool,
    methods: Iterable[str] | None = None,
    progress: bool = True,
    out: Path | None = None,
    threads: Sequence[int] | None = None,
) -> str:
    """The whole benchmark as markdown: a table per case, then the targets; also written to ``out`` if given.
    With several ``threads`` counts (default: torch's current count alone) the whole benchmark runs at each, in
    order, and the tables of the later counts get a column of each row's speed-up over the first count. Every
    argument is checked, and ``out`` probed, before anything is timed: a mistake found after minutes of timing
    would waste them.

    Raises:
        ValueError: an unknown case, device or method (:func:`check_cases`, :func:`check_methods`), ``repeats`` < 1,
            a thread count < 1.
        OSError: ``out`` cannot be written.
        ImportError: tqdm (the ``bench`` extra) or, with ``with_torchjd``, torchjd is not installed.
    """
    names = check_cases(cases)
    chosen = None if methods is None else check_methods(methods)
    device = resolve_device(device)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    counts = [torch.get_num_threads()] if not threads else list(threads)
    if min(counts) < 1:
        raise ValueError(f"thread counts must be >= 1, got {counts}")
    if out is not None:
        check_writable(out)
    require("tqdm", what="the speed benchmark")
    from tqdm import tqdm

    if with_torchjd and not torchjd_steps.available():
        raise ImportError(torchjd_steps.INSTALL_HINT + " (or pass --no-torchjd)")
    before = torch.get_num_threads()
    first: dict[tuple[str, str], float] = {}
    parts = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            runs = [
                (name, *run_case(name, device, repeats, with_torchjd, chosen))
                for name in tqdm(names, desc=f"speed, {count} thread(s)", unit="model", disable=not progress)
            ]
            all_rows = [row for _, _, rows in runs for row in rows]
            for row in all_rows:
                first.setdefault((row.case, row.name), row.ms)
                row.scaling = first[row.case, row.name] / row.ms
            scaled_from = counts[0] if count != counts[0] else None
            heading = "#" if len(counts) > 1 else ""  # each count's tables one level down, under its own title
            if heading:
                parts.append(f"# {count} thread(s)\n")
            parts.append(_timing_line(device, repeats))
            for name, description, rows in runs:
                title, _, note = description.partition("\n\n")  # the model, then what auto chose on it
                above = f"{note}\n\n" if note else ""
                parts.append(
                    f"{heading}## {name}: {title}, K = {rows[0].n_tasks}\n\n{above}{case_table(rows, scaled_from)}\n"
                )
            parts.append(f"{heading}## Targets\n\n{targets_table(targets(all_rows))}\n")
    finally:
        torch.set_num_threads(before)
    parts.append(NOTES)
    text = "\n".join(parts)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    return text


def _timing_line(device: torch.device, repeats: int) -> str:
    return (
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s); median of {repeats} steps "
        f"({'wall' if uses_wall_time(device) else 'process CPU'} time), timed round-robin\n"
    )
