"""``taskbalance report``: a markdown table and PNG plots from a run folder written by the runner.

The table has one row per method (STL first) and one column per metric (mean ± sample std over the finished
seeds, test values at each seed's best-validation epoch as recorded in ``final.json``), then Δm% against the
single-task baselines (mean ± std over seeds), the mean rank over metrics and the training time per epoch. The
best value of each column is bold (STL excluded; ties are all bold). The numbers come from the run summariser
(:mod:`.summary`) applied to the per-seed ``final.json`` files rather than read from ``results.json``, so a report
can never disagree with the raw results.

Missing pieces (:mod:`.folder`) are reported, not fatal: no STL gives "n/a" for Δm, a seed without ``final.json``
counts as unfinished and is flagged, a single seed shows its std as "—".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..datasets.cache import atomic_open
from .folder import RunFolder, load_run
from .summary import MethodSummary, Stat, stl_reference, stl_stats, summarize

#: the label of the single-task row
STL = "STL"
INSTALL_HINT = "pip install 'taskbalance[bench]'"


@dataclass
class Row:
    """One table row."""

    label: str
    n_finished: int
    n_expected: int
    metrics: dict[str, Stat]
    delta_m: Stat | None = None
    rank: float | None = None
    time_per_epoch_s: float | None = None

    @property
    def delta_m_per_seed(self) -> list[float]:
        """Δm% of each finished seed (for plots); empty without a Δm."""
        return [] if self.delta_m is None else list(self.delta_m.values)

    @classmethod
    def of(cls, summary: MethodSummary, n_expected: int) -> Row:
        return cls(
            summary.name,
            len(summary.seeds),
            n_expected,
            summary.metrics,
            summary.delta_m,
            summary.mean_rank,
            summary.time_per_epoch_s,
        )


def stl_values(run: RunFolder) -> dict[str, float] | None:
    """Each metric's single-task value (mean over that task's finished STL seeds); None if a task has none."""
    if any(task not in run.stl for task in run.tasks):
        return None
    return stl_reference(run.metrics, run.stl_results())


def table_rows(run: RunFolder) -> list[Row]:
    """The table rows: STL first (when any baseline exists), then the methods in the run's order."""
    rows: list[Row] = []
    if run.stl:
        times = [[r.time_per_epoch_s for r in runs.finished.values()] for runs in run.stl.values()]
        known = [[t for t in task if t is not None] for task in times]
        total = math.fsum(math.fsum(t) / len(t) for t in known) if all(known) else None
        finished = min(len(runs.finished) for runs in run.stl.values()) if len(run.stl) == len(run.tasks) else 0
        stats = stl_stats(run.metrics, run.stl_results())
        rows.append(Row(STL, finished, len(run.config["seeds"]), stats, time_per_epoch_s=total))
    methods = {runs.name: runs.finished for runs in run.methods}
    reference = stl_values(run)
    try:
        summaries = summarize(run.metrics, methods, reference)
    except ValueError:  # an undefined Δm (a zero STL value) is reported as n/a, not a crash
        summaries = summarize(run.metrics, methods, None)
    return rows + [Row.of(summaries[runs.name], len(runs.expected_seeds)) for runs in run.methods]


def decimals(values: Sequence[float]) -> int:
    """Decimals that show about four significant digits of the largest magnitude in a column (0 to 6)."""
    largest = max((abs(v) for v in values if v != 0 and math.isfinite(v)), default=1.0)
    return min(6, max(0, 3 - math.floor(math.log10(largest))))


def _fmt(value: float, places: int) -> str:
    return f"{value:.{places}f}"


def _fmt_stat(s: Stat | None, places: int) -> str:
    if s is None:
        return "—"
    std = "—" if s.std is None else _fmt(s.std, places)
    return f"{_fmt(s.mean, places)} ± {std}"


def _bold_best(cells: dict[str, str], keys: dict[str, float], lower_is_better: bool) -> dict[str, str]:
    """Bold the cells whose key (the displayed, rounded value) is best; STL is never a candidate."""
    candidates = {label: v for label, v in keys.items() if label != STL}
    if not candidates:
        return cells
    best = min(candidates.values()) if lower_is_better else max(candidates.values())
    return {label: f"**{text}**" if candidates.get(label) == best else text for label, text in cells.items()}


def _column(
    rows: list[Row], value: Callable[[Row], Stat | None], lower_is_better: bool, places: int | None = None
) -> dict[str, str]:
    stats = {r.label: value(r) for r in rows}
    places = decimals([s.mean for s in stats.values() if s is not None]) if places is None else places
    cells = {label: _fmt_stat(s, places) for label, s in stats.items()}
    keys = {label: float(_fmt(s.mean, places)) for label, s in stats.items() if s is not None}
    return _bold_best(cells, keys, lower_is_better)


def _metric_of(name: str) -> Callable[[Row], Stat | None]:
    return lambda row: row.metrics.get(name)


def table(run: RunFolder, rows: list[Row]) -> str:
    """The markdown table (best per column in bold, STL excluded)."""
    columns: list[tuple[str, dict[str, str]]] = []
    for m in run.metrics:
        header = f"{m.name} {'↑' if m.higher_is_better else '↓'}"
        columns.append((header, _column(rows, _metric_of(m.name), not m.higher_is_better)))
    if any(r.delta_m is not None for r in rows):
        delta = _column(rows, lambda r: r.delta_m, lower_is_better=True, places=2)
        delta[STL] = "0.00"
    else:
        delta = {r.label: "n/a" for r in rows}
    columns.append(("Δm% ↓", delta))
    ranks = {r.label: r.rank for r in rows}
    rank_cells = {label: "—" if v is None else f"{v:.2f}" for label, v in ranks.items()}
    columns.append(
        ("mean rank ↓", _bold_best(rank_cells, {k: round(v, 2) for k, v in ranks.items() if v is not None}, True))
    )
    times = {r.label: r.time_per_epoch_s for r in rows}
    places = max(1, decimals([v for v in times.values() if v is not None]) - 2)  # 3 significant digits, ≥ 1 decimal
    time_cells = {label: "—" if v is None else _fmt(v, places) for label, v in times.items()}
    time_keys = {k: round(v, places) for k, v in times.items() if v is not None}
    columns.append(("time/epoch (s) ↓", _bold_best(time_cells, time_keys, True)))
    lines = [
        "| method | " + " | ".join(h for h, _ in columns) + " |",
        "|:--|" + "--:|" * len(columns),
    ]
    for r in rows:
        label = r.label
        if r.label != STL and r.n_finished < r.n_expected:
            label += f" † ({r.n_finished}/{r.n_expected} seeds)"
        lines.append(f"| {label} | " + " | ".join(cells[r.label] for _, cells in columns) + " |")
    return "\n".join(lines)


def _header(run: RunFolder) -> list[str]:
    c = run.config
    protocol = f"`{c.get('protocol', '?')}`"
    if c.get("reduced"):
        protocol = f"**REDUCED** {protocol}"
    seeds = ", ".join(str(s) for s in c.get("seeds", []))
    lines = [
        f"# {c.get('benchmark', run.path.name)}: comparison of task-balancing methods",
        "",
    ]
    if c.get("reduced"):
        lines += [
            "> **REDUCED PROTOCOL**: these numbers come from a shortened protocol (fewer epochs and/or a data subset);",
            "> they show relative behaviour, not the paper's numbers.",
            "",
        ]
    lines += [
        f"- Benchmark: `{c.get('benchmark', '?')}`, protocol {protocol}: {c.get('protocol_description', '')}",
        f"- Seeds: {seeds} · epochs: {c.get('epochs', '?')} · batch size: {c.get('batch_size', '?')} · "
        f"lr: {c.get('lr', '?')} · device: `{c.get('device', '?')}`",
        "- Selection: each seed's **test** metrics at its **best validation epoch**; cells are mean ± sample std "
        "(n − 1) over the finished seeds (— with a single seed).",
        "- Δm% = (1/M) Σ_i (−1)^δ_i (M_i − M_i^STL) / M_i^STL × 100 (δ_i = 1 when higher is better; lower is better), "
        "per seed against the STL mean, then mean ± std; recomputed from `final.json`. Mean rank over metrics "
        "(STL excluded). Best per column in **bold** (STL excluded).",
    ]
    if c.get("command"):
        lines.append(f"- Command: `{c['command']}`")
    versions = c.get("versions")
    if isinstance(versions, Mapping) and versions:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines


def _notes(run: RunFolder, rows: list[Row]) -> list[str]:
    notes: list[str] = []
    missing = [t for t in run.tasks if t not in run.stl]
    if missing:
        notes.append(
            "Δm% is n/a: no finished single-task (STL) baseline for task(s) "
            + ", ".join(f"`{t}`" for t in missing)
            + "; rerun `taskbalance run` without skipping STL to get it."
        )
    baseline = stl_values(run)
    if baseline is not None and any(v == 0.0 for v in baseline.values()):
        zero = ", ".join(f"`{k}`" for k, v in baseline.items() if v == 0.0)
        notes.append(f"Δm% is n/a: the STL value of {zero} is 0, so its relative change is undefined.")
    for runs in [*run.methods, *run.stl.values()]:
        if not runs.complete:
            done = sorted(runs.finished)
            what = runs.name if runs in run.methods else f"STL `{runs.name}`"
            notes.append(
                f"† `{what}`: {len(done)}/{len(runs.expected_seeds)} seeds finished"
                + (f" (seeds {', '.join(map(str, done))})" if done else "")
                + "; its numbers cover only those. Resume with `taskbalance run ... --resume`."
            )
    if any(r.n_finished == 1 for r in rows):
        notes.append("A single finished seed has no spread: its std shows as —.")
    return notes


def render_markdown(run: RunFolder, rows: list[Row], figures: Sequence[tuple[str, str]], plot_note: str | None) -> str:
    """The report: header, table, notes, then each figure (file name, caption)."""
    lines = [*_header(run), "", table(run, rows), ""]
    notes = _notes(run, rows)
    if notes:
        lines += ["**Notes**", "", *(f"- {n}" for n in notes), ""]
    if plot_note:
        lines += [f"> {plot_note}", ""]
    for name, caption in figures:
        lines += [f"![{Path(name).stem}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: Path, out_dir: Path | None = None, *, plots: bool = True) -> Path:
    """Write ``report.md`` (and the PNG plots unless ``plots`` is False) to ``out_dir`` (default
    ``run_dir/report``) and return the markdown file's path. Prints nothing.

    Without matplotlib the table is still written, with a note that says how to install the plots' extra.
    """
    run = load_run(run_dir)
    out = Path(run_dir) / "report" if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(run)
    figures: list[tuple[str, str]] = []
    plot_note: str | None = None
    if plots:
        try:
            from . import plots as drawing
        except ImportError as error:
            plot_note = f"Plots skipped: {error}. Install them with `{INSTALL_HINT}`."
        else:
            figures = drawing.draw_all(run, rows, out)
    path = out / "report.md"
    with atomic_open(path) as handle:
        handle.write(render_markdown(run, rows, figures, plot_note).encode())
    return path


__all__ = ["STL", "Row", "render_markdown", "stl_values", "table", "table_rows", "write_report"]
