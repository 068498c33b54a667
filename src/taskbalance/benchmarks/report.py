"""``taskbalance report``: a markdown table and PNG plots from a run folder written by the runner.

The table has one row per method (STL first) and one column per metric (mean ± sample std over the finished
seeds, test values at each seed's best-validation epoch as recorded in ``final.json``), then Δm% against the
single-task baselines (mean ± std over seeds), the mean rank over metrics and the training time per epoch. The
best value of each column is bold (STL excluded; ties are all bold). Δm is recomputed here from the per-seed
``final.json`` files rather than read from ``results.json``, so a report can never disagree with the raw results.

Everything is read from the folder layout the runner writes (``config.json``, ``runs/<slug>/seed<s>/...``,
``stl/<task>/seed<s>/...``); missing pieces are reported, not fatal: no STL gives "n/a" for Δm, a seed without
``final.json`` counts as unfinished and is flagged, a single seed shows its std as "—".
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .base import Metric
from .cache import atomic_open

#: the label of the single-task row
STL = "STL"
INSTALL_HINT = "pip install 'taskbalance[bench]'"
DeltaM = Callable[[dict[str, float], dict[str, float], dict[str, bool]], float]


@dataclass(frozen=True)
class SeedResult:
    """What ``final.json`` records for one finished seed."""

    seed: int
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    time_per_epoch_s: float | None
    overhead_s_per_step: float | None


@dataclass(frozen=True)
class WeightsTrace:
    """One seed's ``weights.csv``: sampled optimisation steps, their epochs and the (rows, K) effective weights."""

    steps: list[int]
    epochs: list[int]
    weights: list[list[float]]


@dataclass
class MethodRuns:
    """Everything stored for one method (or one STL task): finished seeds, per-epoch histories, weight traces."""

    name: str
    expected_seeds: list[int]
    finished: dict[int, SeedResult] = field(default_factory=dict)
    history: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    weights: dict[int, WeightsTrace] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(seed in self.finished for seed in self.expected_seeds)


@dataclass
class RunFolder:
    """A parsed run folder."""

    path: Path
    config: dict[str, Any]
    tasks: list[str]
    metrics: list[Metric]
    methods: list[MethodRuns]
    #: task -> its single-task runs (absent tasks have no baseline)
    stl: dict[str, MethodRuns]


@dataclass(frozen=True)
class Stat:
    """Mean and sample std over seeds (std None with a single seed)."""

    mean: float
    std: float | None
    n: int


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
    #: Δm% of each finished seed (for plots)
    delta_m_per_seed: list[float] = field(default_factory=list)


def slug(spec: str) -> str:
    """The folder name of a method spec ('+' becomes '__')."""
    return spec.replace("+", "__")


def stat(values: Sequence[float]) -> Stat | None:
    """Mean ± sample standard deviation (n − 1 in the denominator); None for no values."""
    if not values:
        return None
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n)


def _delta_m(values: dict[str, float], stl: dict[str, float], higher_is_better: dict[str, bool]) -> float:
    # Private Δm% until taskbalance.benchmarks.delta_m lands (same signature, so the two can be deduplicated):
    # (1/M) Σ_i (−1)^{δ_i} (M_i − M_i^STL) / M_i^STL × 100 over the metrics in ``stl``; δ_i = 1 when higher is better.
    # A zero baseline makes the relative change undefined: ValueError, as the shared function raises.
    if any(base == 0.0 for base in stl.values()):
        raise ValueError("an STL value is 0: the relative change Δm% is undefined")
    terms = [
        (-1.0 if higher_is_better[name] else 1.0) * (values[name] - base) / abs(base) * 100.0
        for name, base in stl.items()
    ]
    return math.fsum(terms) / len(terms)


def delta_m_function() -> DeltaM:
    """``taskbalance.benchmarks.delta_m.delta_m`` when that module exists, else this module's own copy."""
    try:
        module = importlib.import_module("taskbalance.benchmarks.delta_m")
    except ImportError:
        return _delta_m
    return cast(DeltaM, module.delta_m)


# ----------------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun or resume the run that wrote it") from error


def _read_history(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a truncated last line (a run killed mid-write) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {i + 1}, is not valid JSON ({error})") from error
    return records


def _read_weights(path: Path, n_tasks: int) -> WeightsTrace | None:
    if not path.exists():
        return None
    steps: list[int] = []
    epochs: list[int] = []
    weights: list[list[float]] = []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return None
        if header[:2] != ["step", "epoch"] or len(header) != 2 + n_tasks:
            raise ValueError(f"{path} has header {','.join(header)!r}; expected 'step,epoch' and one column per task")
        for row in reader:
            if len(row) != len(header):  # a row cut short by an interrupted write
                continue
            steps.append(int(row[0]))
            epochs.append(int(row[1]))
            weights.append([float(v) for v in row[2:]])
    return WeightsTrace(steps, epochs, weights) if steps else None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _read_runs(directory: Path, name: str, seeds: list[int], n_tasks: int | None) -> MethodRuns:
    """One method's (or, with ``n_tasks`` None, one STL task's: no weights to plot) seeds."""
    runs = MethodRuns(name, list(seeds))
    found = sorted(int(p.name[4:]) for p in directory.glob("seed*") if p.is_dir() and p.name[4:].isdigit())
    for seed in sorted(set(seeds) | set(found)):
        seed_dir = directory / f"seed{seed}"
        history = _read_history(seed_dir / "metrics.jsonl")
        if history:
            runs.history[seed] = history
        trace = None if n_tasks is None else _read_weights(seed_dir / "weights.csv", n_tasks)
        if trace is not None:
            runs.weights[seed] = trace
        final_path = seed_dir / "final.json"
        if final_path.exists():
            final = _read_json(final_path)
            runs.finished[seed] = SeedResult(
                seed=seed,
                best_epoch=int(final["best_epoch"]),
                val={k: float(v) for k, v in final.get("val", {}).items()},
                test={k: float(v) for k, v in final["test"].items()},
                time_per_epoch_s=_optional_float(final.get("time_per_epoch_s")),
                overhead_s_per_step=_optional_float(final.get("balancing_overhead_s_per_step")),
            )
    return runs


def load_run(run_dir: str | Path) -> RunFolder:
    """Parse a run folder (see the module docstring for what may be missing)."""
    path = Path(run_dir)
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{path} is not a run folder (no config.json); create one with `taskbalance run <benchmark> --out {path}`"
        )
    config = _read_json(config_path)
    tasks = [str(t) for t in config["tasks"]]
    metrics = [Metric(str(m["name"]), str(m["task"]), bool(m["higher_is_better"])) for m in config["metrics"]]
    seeds = [int(s) for s in config["seeds"]]
    methods = [_read_runs(path / "runs" / slug(spec), spec, seeds, len(tasks)) for spec in config["methods"]]
    stl: dict[str, MethodRuns] = {}
    for task in tasks:
        task_dir = path / "stl" / task
        if task_dir.is_dir():
            runs = _read_runs(task_dir, task, seeds, None)
            if runs.finished:
                stl[task] = runs
    return RunFolder(path, config, tasks, metrics, methods, stl)


# ----------------------------------------------------------------------------------------------------- summary


def stl_values(run: RunFolder) -> dict[str, float] | None:
    """Each metric's single-task value (mean over that task's finished STL seeds); None if a task has none."""
    if any(task not in run.stl for task in run.tasks):
        return None
    values: dict[str, float] = {}
    for metric in run.metrics:
        seeds = run.stl[metric.task].finished.values()
        s = stat([r.test[metric.name] for r in seeds if metric.name in r.test])
        if s is None:
            return None
        values[metric.name] = s.mean
    return values


def _average_ranks(values: dict[str, float], higher_is_better: bool) -> dict[str, float]:
    """Rank 1 = best; tied values share the average of their ranks."""
    ordered = sorted(values, key=lambda k: -values[k] if higher_is_better else values[k])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and values[ordered[j + 1]] == values[ordered[i]]:
            j += 1
        for k in ordered[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def summarize(run: RunFolder, delta_m: DeltaM | None = None) -> list[Row]:
    """The table rows: STL first (when any baseline exists), then the methods in the run's order."""
    delta_m = delta_m_function() if delta_m is None else delta_m
    directions = {m.name: m.higher_is_better for m in run.metrics}
    rows: list[Row] = []
    if run.stl:
        stl_metrics: dict[str, Stat] = {}
        for metric in run.metrics:
            if metric.task in run.stl:
                s = stat([r.test[metric.name] for r in run.stl[metric.task].finished.values() if metric.name in r.test])
                if s is not None:
                    stl_metrics[metric.name] = s
        times = [stat(_times(runs)) for runs in run.stl.values()]
        total = math.fsum(t.mean for t in times if t is not None) if all(times) else None
        finished = min(len(runs.finished) for runs in run.stl.values()) if len(run.stl) == len(run.tasks) else 0
        rows.append(Row(STL, finished, len(run.config["seeds"]), stl_metrics, time_per_epoch_s=total))
    baseline = stl_values(run)
    method_rows: list[Row] = []
    for runs in run.methods:
        results = [runs.finished[s] for s in sorted(runs.finished)]
        metric_stats = {m.name: stat([r.test[m.name] for r in results if m.name in r.test]) for m in run.metrics}
        row = Row(
            runs.name,
            len(results),
            len(runs.expected_seeds),
            {k: v for k, v in metric_stats.items() if v is not None},
        )
        time = stat(_times(runs))
        row.time_per_epoch_s = None if time is None else time.mean
        if baseline is not None:
            try:
                per_seed = [
                    delta_m({k: r.test[k] for k in baseline}, dict(baseline), directions)
                    for r in results
                    if all(k in r.test for k in baseline)
                ]
            except ValueError:  # an undefined Δm (a zero STL value) is reported as n/a, not a crash
                baseline = None
            else:
                row.delta_m_per_seed = per_seed
                row.delta_m = stat(per_seed)
        method_rows.append(row)
    ranked = [r for r in method_rows if len(r.metrics) == len(run.metrics)]
    if ranked:
        per_metric = [
            _average_ranks({r.label: r.metrics[m.name].mean for r in ranked}, m.higher_is_better) for m in run.metrics
        ]
        for r in ranked:
            r.rank = math.fsum(ranks[r.label] for ranks in per_metric) / len(per_metric)
    return rows + method_rows


def _times(runs: MethodRuns) -> list[float]:
    return [r.time_per_epoch_s for r in runs.finished.values() if r.time_per_epoch_s is not None]


# ---------------------------------------------------------------------------------------------------- markdown


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
    rows = summarize(run)
    figures: list[tuple[str, str]] = []
    plot_note: str | None = None
    if plots:
        try:
            from . import report_plots
        except ImportError as error:
            plot_note = f"Plots skipped: {error}. Install them with `{INSTALL_HINT}`."
        else:
            figures = report_plots.draw_all(run, rows, out)
    path = out / "report.md"
    with atomic_open(path) as handle:
        handle.write(render_markdown(run, rows, figures, plot_note).encode())
    return path


__all__ = [
    "STL",
    "MethodRuns",
    "Row",
    "RunFolder",
    "SeedResult",
    "Stat",
    "WeightsTrace",
    "delta_m_function",
    "load_run",
    "render_markdown",
    "slug",
    "stat",
    "summarize",
    "table",
    "write_report",
]
