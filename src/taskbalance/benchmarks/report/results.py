"""A run folder's ``results.json`` / ``results.csv`` and the markdown table the runner prints, from the run
summary of :mod:`.summary` (test metrics at the selected epoch, Δm% against the single-task baselines, mean rank).

``results.json``: {"benchmark", "protocol", "reduced", "description", "selection_rule", "seeds", "notes", "metrics":
[{"name", "task", "higher_is_better"}], "stl": {"mean": {metric: v}, "per_seed": {seed: {metric: v}}},
"methods": {spec: {"metrics": {metric: {"mean", "std", "values"}}, "delta_m": {"mean", "std", "values"},
"mean_rank", "time_per_epoch_s", "balancing_overhead_s_per_step"}}}. ``results.csv``: one row per method × seed
(STL rows first, method ``stl``): method, seed, every metric, delta_m_percent, mean_rank, time_per_epoch_s.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..base import Metric
from ..datasets.cache import atomic_open
from ..metrics.delta_m import delta_m
from .summary import SeedResult, stat, stl_reference, summarize


def results_json(
    header: Mapping[str, Any],
    tasks: Sequence[str],
    metrics: Sequence[Metric],
    stl: Mapping[str, Mapping[int, SeedResult]],
    finals: Mapping[str, Mapping[int, SeedResult]],
) -> dict[str, Any]:
    """results.json's dict.

    Args:
        header: benchmark, protocol, reduced, description, selection_rule, seeds, notes.
        tasks: the benchmark's tasks, in order.
        metrics: the benchmark's metrics.
        stl: task → seed → the single-task baseline's result.
        finals: method spec → seed → that run's result.
    """
    reference = stl_reference(metrics, stl)
    if reference is None:
        raise ValueError("every task needs a finished single-task baseline to summarise a run")
    methods: dict[str, dict[str, Any]] = {}
    for spec, summary in summarize(metrics, finals, reference).items():
        assert summary.delta_m is not None
        methods[spec] = {
            "seeds": summary.seeds,
            "metrics": {name: s.as_dict() for name, s in summary.metrics.items()},
            "delta_m": summary.delta_m.as_dict(),
            "time_per_epoch_s": summary.time_per_epoch_s,
            "balancing_overhead_s_per_step": summary.overhead_s_per_step,
        }
        if summary.mean_rank is not None:
            methods[spec]["mean_rank"] = summary.mean_rank
    seeds = sorted({seed for runs in stl.values() for seed in runs})
    per_seed = {str(s): {k: v for task in tasks for k, v in stl[task][s].test.items()} for s in seeds}
    return {
        **dict(header),
        "metrics": [{"name": m.name, "task": m.task, "higher_is_better": m.higher_is_better} for m in metrics],
        "stl": {"mean": reference, "per_seed": per_seed},
        "methods": methods,
    }


def write_results(out_dir: Path, results: Mapping[str, Any], stl_times: Mapping[int, float]) -> None:
    """results.json and results.csv in ``out_dir`` (atomically)."""
    with atomic_open(out_dir / "results.json") as handle:
        handle.write((json.dumps(results, indent=2) + "\n").encode())
    names = [m["name"] for m in results["metrics"]]
    directions = {m["name"]: m["higher_is_better"] for m in results["metrics"]}
    reference = results["stl"]["mean"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "seed", *names, "delta_m_percent", "mean_rank", "time_per_epoch_s"])
    for seed, values in results["stl"]["per_seed"].items():
        dm = delta_m(values, reference, directions)
        writer.writerow(["stl", seed, *(repr(values[n]) for n in names), repr(dm), "", repr(stl_times[int(seed)])])
    for spec, entry in results["methods"].items():
        for i, seed in enumerate(entry["seeds"]):
            values = [repr(entry["metrics"][n]["values"][i]) for n in names]
            writer.writerow(
                [
                    spec,
                    seed,
                    *values,
                    repr(entry["delta_m"]["values"][i]),
                    repr(entry.get("mean_rank", math.nan)),
                    repr(entry["time_per_epoch_s"]),
                ]
            )
    with atomic_open(out_dir / "results.csv") as handle:
        handle.write(buffer.getvalue().encode())


def _stl_stat(values: Sequence[float]) -> dict[str, Any]:
    found = stat(values)
    assert found is not None, "results.json has no single-task seed"
    return found.as_dict()


def _cell(spread: Mapping[str, Any], digits: int) -> str:
    mean = spread["mean"]
    text = f"{mean:.{digits}f}"
    if text.lstrip("-").strip("0.") == "":
        text = f"{0.0:.{digits}f}"  # no "-0.00"
    return text if spread["std"] is None else f"{text} ± {spread['std']:.{digits}f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """The comparison table (mean ± std over seeds, Δm%, rank, time), headed by the protocol and the rule."""
    metrics = results["metrics"]
    methods = results["methods"]
    n_seeds = len(results["seeds"])
    label = " — REDUCED protocol" if results["reduced"] else ""
    seeds = ", ".join(map(str, results["seeds"]))
    spread = f"Mean ± sample std over {n_seeds} seeds ({seeds})" if n_seeds > 1 else f"One seed ({seeds})"
    lines = [
        f"**{results['benchmark']}**, protocol `{results['protocol']}`{label}: {results['description']}",
        "",
        f"{spread}; {results['selection_rule']}. Δm% against the single-task baselines (lower is better); "
        "s / epoch: training seconds per epoch.",
        "",
    ]
    arrows = ["↑" if m["higher_is_better"] else "↓" for m in metrics]
    lines.append(
        "| method | "
        + " | ".join(f"{m['name']} {a}" for m, a in zip(metrics, arrows, strict=True))
        + " | Δm% ↓ | mean rank ↓ | s / epoch |"
    )
    lines.append("|---|" + "---:|" * (len(metrics) + 3))
    per_seed = results["stl"]["per_seed"].values()
    stl_cells = [_cell(_stl_stat([float(v[m["name"]]) for v in per_seed]), 2) for m in metrics]
    lines.append("| STL | " + " | ".join(stl_cells) + " | 0.00 | – | – |")
    best: dict[str, float] = {}
    for m in metrics:
        values = [entry["metrics"][m["name"]]["mean"] for entry in methods.values()]
        if values:
            best[m["name"]] = max(values) if m["higher_is_better"] else min(values)
    best_dm = min((e["delta_m"]["mean"] for e in methods.values()), default=math.nan)
    best_rank = min((e["mean_rank"] for e in methods.values()), default=math.nan)
    for spec, entry in methods.items():
        cells = []
        for m in metrics:
            cell = _cell(entry["metrics"][m["name"]], 2)
            cells.append(f"**{cell}**" if entry["metrics"][m["name"]]["mean"] == best[m["name"]] else cell)
        dm = _cell(entry["delta_m"], 2)
        dm = f"**{dm}**" if entry["delta_m"]["mean"] == best_dm else dm
        rank = f"{entry['mean_rank']:.2f}"
        rank = f"**{rank}**" if entry["mean_rank"] == best_rank else rank
        lines.append(f"| {spec} | " + " | ".join(cells) + f" | {dm} | {rank} | {entry['time_per_epoch_s']:.1f} |")
    lines.append("")
    lines.append("Bold: the best method per column.")
    lines.extend(f"Note: {note}." for note in results.get("notes", []))
    return "\n".join(lines)
