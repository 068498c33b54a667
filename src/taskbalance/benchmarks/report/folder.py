"""Reading a run folder written by the runner: ``config.json``, ``runs/<slug>/seed<s>/...`` and
``stl/<task>/seed<s>/...`` (``final.json``, ``metrics.jsonl``, ``weights.csv``).

Missing pieces are not fatal: a seed without ``final.json`` counts as unfinished, a task without a finished
single-task run has no baseline, and a line cut short by a killed run is dropped.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base import Metric
from .summary import SeedResult, slug


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

    def stl_results(self) -> dict[str, dict[int, SeedResult]]:
        """task → seed → its finished single-task result."""
        return {task: runs.finished for task, runs in self.stl.items()}


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
            runs.finished[seed] = SeedResult.from_final(seed, _read_json(final_path))
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
