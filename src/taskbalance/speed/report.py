"""The speed benchmark's tables and its speed targets, each marked as holding or not.

The targets bound a method's step against what it cannot avoid, measured in the same run: a loss method adds at
most 5 % to an EW step; an exact gradient method at most 10 % to the cheapest exact per-task gradients (the cost
floor); ours take at most 90 % of torchjd's time for the same aggregator; a representation-level method at most
30 % over EW, as does an amortised one (Gramian every 10 steps, K ≤ 11); and a solver working from the K × K
Gramian takes at most 1 ms for K ≤ 10, 10 ms beyond.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ..engine import PathTuner

#: the bounds on a ratio to EW, to the cost floor, or to torchjd, measured in the same run
LOSS_TARGET = 1.05
FLOOR_TARGET = 1.10
TORCHJD_TARGET = 0.90
REPRESENTATION_TARGET = 1.30
AMORTISED_TARGET = 1.30


@dataclass
class Row:
    case: str
    n_tasks: int
    name: str
    kind: str
    ms: float
    vs_ew: float
    vs_floor: float
    vs_torchjd: float  # nan when there is no torchjd counterpart
    solve_ms: float  # nan for methods without a solver call (loss methods, amortised reuse)
    peak_mb: float
    reads_gramian: bool = False  # a small K × K problem: the solver target applies
    #: ms at the first thread count of the run / ms here (the speed-up from more threads); nan on a single count
    scaling: float = math.nan


#: the solver target; :func:`solver_bound` is its bound at K tasks
SOLVER_TARGET = "solver from G ≤ 1 ms (K ≤ 10), ≤ 10 ms (K > 10)"


def solver_bound(n_tasks: int) -> float:
    return 1.0 if n_tasks <= 10 else 10.0


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def case_table(rows: list[Row], scaled_from: int | None = None) -> str:
    """One case's rows; with ``scaled_from`` (a thread count), a last column of each row's speed-up over it."""
    head = "| method | kind | ms/step | × EW | × floor | × torchjd | solve ms | peak MiB |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if scaled_from is not None:
        head, rule = head + f" speed-up vs {scaled_from} thread(s) |", rule + "---:|"
    # solve ms of a method that reads J (DB-MTL, GradDrop, MoCo) is O(K·P) work on J, marked with a J
    lines = [head, rule]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.kind} | {r.ms:.2f} | {r.vs_ew:.2f} | {_fmt(r.vs_floor)} | {_fmt(r.vs_torchjd)} | "
            f"{_fmt(r.solve_ms, 3)}{'' if r.reads_gramian or math.isnan(r.solve_ms) else ' (J)'} | "
            f"{_fmt(r.peak_mb, 1)} |" + ("" if scaled_from is None else f" {_fmt(r.scaling)} |")
        )
    return "\n".join(lines)


@dataclass
class Target:
    label: str
    misses: list[str]
    checked: int

    @property
    def holds(self) -> bool:
        return not self.misses and self.checked > 0


def targets(rows: list[Row]) -> list[Target]:
    """Each target over every row it applies to, with the rows that miss it (case: name ratio)."""

    def check(label: str, applies: list[Row], value: str, bound: float) -> Target:
        misses = [
            f"{r.case}: {r.name} {getattr(r, value):.2f}"
            for r in applies
            if not math.isnan(getattr(r, value)) and getattr(r, value) > bound
        ]
        return Target(label, misses, sum(not math.isnan(getattr(r, value)) for r in applies))

    loss = [r for r in rows if r.kind == "loss"]
    ew = [r for r in rows if r.kind == "ew"]
    exact = [r for r in rows if r.kind == "gradient"]
    rep = [r for r in rows if r.kind == "representation"]
    amortised = [r for r in rows if r.kind == "amortised" and r.n_tasks <= 11]
    solved = [r for r in rows if r.reads_gramian and not math.isnan(r.solve_ms)]
    solver = Target(
        SOLVER_TARGET,
        [f"{r.case}: {r.name} {r.solve_ms:.2f} ms" for r in solved if r.solve_ms > solver_bound(r.n_tasks)],
        len(solved),
    )
    return [
        check(f"loss methods ≤ {LOSS_TARGET}× EW", loss, "vs_ew", LOSS_TARGET),
        check(f"exact gradient methods ≤ {FLOOR_TARGET}× floor", exact, "vs_floor", FLOOR_TARGET),
        check(f"≤ {TORCHJD_TARGET}× torchjd's same aggregator", [*ew, *exact], "vs_torchjd", TORCHJD_TARGET),
        check(f"representation ≤ {REPRESENTATION_TARGET}× EW", rep, "vs_ew", REPRESENTATION_TARGET),
        check(f"amortised (N = 10, K ≤ 11) ≤ {AMORTISED_TARGET}× EW", amortised, "vs_ew", AMORTISED_TARGET),
        solver,
    ]


def targets_table(found: list[Target]) -> str:
    lines = ["| target | holds | rows checked | misses |", "|---|---|---:|---|"]
    for t in found:
        misses = "; ".join(t.misses) if t.misses else ""
        holds = "n/a" if t.checked == 0 else "yes" if t.holds else "no"
        lines.append(f"| {t.label} | {holds} | {t.checked} | {misses} |")
    return "\n".join(lines)


def solve_median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def auto_note(tuner: PathTuner) -> str:
    """One line per trial of ``engine="auto"``: what it chose for the methods that read G, and for those that
    read J, from which candidates' best times (ms), and which candidates left the trial."""
    lines = []
    for key, path in tuner.chosen.items():
        readers = "G" if key.endswith("G=1") else "J"
        times = ", ".join(f"{p} {s * 1e3:.1f}" for p, s in sorted(tuner.timings.get(key, {}).items(), key=_second))
        left = "; ".join(f"{p} left: {why}" for p, why in tuner.dropped.get(key, {}).items())
        lines.append(f"`auto` for methods reading {readers}: **{path}** (ms: {times}{'; ' + left if left else ''})")
    return "  \n".join(lines)


def _second(item: tuple[str, float]) -> float:
    return item[1]
