"""Reading a run folder written by the runner: ``config.json``, ``runs/<name>/seed<s>/...`` and
``stl/<task>/seed<s>/...`` (``final.json``, ``metrics.jsonl``, ``weights.csv``).

A method's folder name (:func:`method_dir`) comes from its canonical spec, made safe: one path component that
can never leave ``runs/``. Missing pieces are not fatal: a seed without ``final.json`` counts as unfinished, a
task without a finished single-task run has no baseline, and a line cut short by a killed run is dropped. A file
that is there but cannot be read (a hand-edited ``config.json`` or ``final.json``) is one :class:`RunFolderError`
naming it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base import Metric
from .summary import SeedResult

#: characters a method folder name keeps; the brackets and commas keep today's names of specs with options
_SAFE = re.compile(r"[^a-z0-9_.=,()\[\]-]")
_MAX_NAME = 96


class RunFolderError(ValueError):
    """A file of a run folder is unreadable or not what the runner writes; the message names it."""


def method_dir(spec: str) -> str:
    """The folder name under ``runs/`` of a canonical method spec: ``+`` between methods becomes ``__``
    (``igbv1+nashmtl`` → ``igbv1__nashmtl``), ``nashmtl[update_weights_every=10]`` keeps its name. Any other
    character outside ``[a-z0-9_.=,()[]-]`` (a ``/``, an upper-case letter, a space ...) becomes ``_``, and then,
    or when the name would be long or start with anything but a letter or digit, a short hash of the spec is
    appended, so distinct specs keep distinct folders. The result is a single path component."""
    head, bracket, options = spec.partition("[")
    name = head.replace("+", "__") + bracket + options
    safe = _SAFE.sub("_", name)
    if safe == name and len(name) <= _MAX_NAME and re.match(r"[a-z0-9]", name):
        return name
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return f"m_{safe[: _MAX_NAME - 14]}-{digest}"


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


def read_json(path: Path) -> Any:
    """``path``'s JSON value; a RunFolderError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} is not valid JSON ({error}); rerun or resume the run that wrote it") from error


def read_final(path: Path, seed: int) -> SeedResult:
    """A run's ``final.json`` as a :class:`SeedResult`; a RunFolderError naming the file when it lacks an entry
    or holds a value of the wrong type (e.g. edited by hand)."""
    final = read_json(path)
    try:
        if not isinstance(final, dict):
            raise TypeError(f"a JSON object is expected, not {type(final).__name__}")
        return SeedResult.from_final(seed, final)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RunFolderError(
            f"{path} is not a final.json the runner writes ({type(error).__name__}: {error}); delete it and run "
            "again with --resume (the run is rebuilt from its checkpoint)"
        ) from error


def read_config(run_dir: Path) -> dict[str, Any]:
    """``run_dir/config.json`` checked for the entries a reader needs (tasks, metrics, seeds, methods)."""
    path = run_dir / "config.json"
    config = read_json(path)
    try:
        if not isinstance(config, dict):
            raise TypeError(f"a JSON object is expected, not {type(config).__name__}")
        for key in ("tasks", "seeds", "methods", "metrics"):
            if not isinstance(config.get(key), list):
                raise TypeError(f"{key!r} is not a list")
        config["seeds"] = [int(s) for s in config["seeds"]]
        config["metrics"] = [
            {"name": str(m["name"]), "task": str(m["task"]), "higher_is_better": bool(m["higher_is_better"])}
            for m in config["metrics"]
        ]
        if not all(isinstance(v, str) for v in (*config["tasks"], *config["methods"])):
            raise TypeError("'tasks' or 'methods' holds a value that is not a string")
    except (KeyError, TypeError, ValueError) as error:
        raise RunFolderError(
            f"{path} is not a config.json the runner writes ({type(error).__name__}: {error}); restore it or use "
            "a new --out"
        ) from error
    return config


def _read_history(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a truncated last line (a run killed mid-write) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if i == len(lines) - 1:
                break
            raise RunFolderError(f"{path}, line {i + 1}, is not valid JSON ({error})") from error
        if not isinstance(record, dict):
            raise RunFolderError(f"{path}, line {i + 1}, is not an epoch record (a JSON object)")
        records.append(record)
    return records


def parse_weights_row(row: list[str], width: int) -> tuple[int, int, list[float]] | None:
    """(step, epoch, weights) of one ``weights.csv`` row of ``width`` fields; None when it is not one (torn)."""
    if len(row) != width:
        return None
    try:
        return int(row[0]), int(row[1]), [float(v) for v in row[2:]]
    except ValueError:
        return None


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
            raise RunFolderError(
                f"{path} has header {','.join(header)!r}; expected 'step,epoch' and one column per task"
            )
        rows = list(reader)
        for i, row in enumerate(rows):
            parsed = parse_weights_row(row, len(header))
            if parsed is None:
                if i == len(rows) - 1:  # the last row cut short by an interrupted write (older runners)
                    break
                raise RunFolderError(f"{path}, row {i + 2}, is not step,epoch and {n_tasks} weights: {row}")
            steps.append(parsed[0])
            epochs.append(parsed[1])
            weights.append(parsed[2])
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
            runs.finished[seed] = read_final(final_path, seed)
    return runs


def load_run(run_dir: str | Path) -> RunFolder:
    """Parse a run folder (see the module docstring for what may be missing)."""
    path = Path(run_dir)
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{path} is not a run folder (no config.json); create one with `taskbalance run <benchmark> --out {path}`"
        )
    config = read_config(path)
    tasks = list(config["tasks"])
    metrics = [Metric(m["name"], m["task"], m["higher_is_better"]) for m in config["metrics"]]
    seeds = config["seeds"]
    methods = [_read_runs(path / "runs" / method_dir(spec), spec, seeds, len(tasks)) for spec in config["methods"]]
    stl: dict[str, MethodRuns] = {}
    for task in tasks:
        task_dir = path / "stl" / task
        if task_dir.is_dir():
            runs = _read_runs(task_dir, task, seeds, None)
            if runs.finished:
                stl[task] = runs
    return RunFolder(path, config, tasks, metrics, methods, stl)
