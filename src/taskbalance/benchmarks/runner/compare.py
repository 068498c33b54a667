"""The experiment runner behind ``taskbalance run``: single-task baselines, then every method × seed, then Δm%.

    from taskbalance.benchmarks.runner import run
    results = run("multimnist", ["ew", "igbv1+nashmtl"], seeds=3, out_dir="runs/mm")

Order: the single-task (STL) baseline of every seed and task, then every seed × method. STL baselines are trained
in the cache (``<cache>/stl/<benchmark>/<protocol, epochs, batch, lr, train size, data digest, device>/<task>/
seed<s>``) and linked (or copied) into ``<out>/stl/<task>/seed<s>``, so another comparison with the same protocol
on the same data reuses them (delete ``<cache>/stl`` to retrain them, e.g. after changing a benchmark's code).
Method runs go to ``<out>/runs/<name>/seed<s>`` (``name``: :func:`~..report.folder.method_dir` of the canonical
spec). Every run writes the files of :mod:`.training`; the run folder also gets ``config.json`` (with the
fingerprint of :mod:`.fingerprint`), ``data_manifest.json``, ``results.json`` / ``results.csv``
(:mod:`~..report.results`) and the printed markdown table, which summarise every method the folder holds.

``resume=True`` checks the fingerprint (any difference is one :class:`~.fingerprint.ResumeError`), skips the
finished runs, continues the others from their last checkpoint, and adds the methods and seeds not yet in the
folder. A start that fails before any run wrote to a new folder (missing data, a missing extra) removes the
config.json it wrote, so the same command starts afresh.

``nproc=N`` > 1 trains the method runs on N local processes, each on its share of every global batch
(:mod:`.launch`); the baselines, the checks and the summary stay in the calling process. The fingerprint records N:
a resume with another N is refused (each rank draws its own dropout stream, so the continued run would be neither
the N- nor the M-process run).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ... import __version__
from ...registry import make
from ..base import Benchmark
from ..catalog import DEFAULT_METHODS, make_benchmark
from ..datasets.cache import atomic_open, cache_dir
from ..report.folder import load_run, method_dir
from ..report.results import markdown_table, results_json, write_results
from .fingerprint import (
    MANIFEST,
    ResumeError,
    canonical_spec,
    check_resume,
    data_manifest,
    describe_method,
    fingerprint,
    manifest_digest,
    merged,
)
from .launch import check_nproc, check_shards, train_on_ranks
from .training import SELECTION_RULE, Job, RunTrainer, Settings, StepHook, torch_threads

#: bump when a change makes cached single-task baselines stale
STL_CACHE_VERSION = 1
_STL_FILES = ("final.json", "metrics.jsonl", "weights.csv", "checkpoint.pt")


@dataclass(frozen=True)
class RunResults:
    """What :func:`run` produced: the results.json dict, the markdown table and the run folder."""

    results: dict[str, Any]
    table: str
    out_dir: Path


#: the largest seed (and seed count) a run takes: seeds become torch generator seeds, which are 64-bit
MAX_SEED = 2**32 - 1


def parse_seeds(seeds: int | Sequence[int]) -> list[int]:
    """``N`` → seeds 0..N−1; a sequence → those seeds (distinct, non-negative)."""
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"the number of seeds must be >= 1, got {seeds}")
        if seeds > MAX_SEED:
            raise ValueError(f"the number of seeds must be <= {MAX_SEED}, got {seeds}")
        return list(range(seeds))
    chosen = [int(s) for s in seeds]
    if any(s > MAX_SEED for s in chosen):
        raise ValueError(f"seeds must be <= {MAX_SEED} (they seed torch's 64-bit generators), got {chosen}")
    if not chosen:
        raise ValueError("no seeds given")
    if any(s < 0 for s in chosen):
        raise ValueError(f"seeds must be >= 0, got {chosen}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"seeds must be distinct, got {chosen}")
    return chosen


def check_methods(methods: Sequence[str], n_tasks: int) -> list[str]:
    """The canonical specs (:func:`.fingerprint.canonical_spec`), each checked by building it once (unknown names
    and bad specs fail here, before training); two spellings of one method are one method listed twice."""
    specs = [m.strip() for m in methods if m.strip()]
    if not specs:
        raise ValueError("no methods given (e.g. --methods ew,igbv1+nashmtl; `taskbalance methods` lists them)")
    canonical = []
    for spec in specs:
        if spec.lower() == "stl":
            raise ValueError("'stl' is not a method: the single-task baselines are always trained")
        try:
            canonical.append(canonical_spec(spec, n_tasks))
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"method {spec!r}: {error} (`taskbalance methods` lists the names)") from error
    duplicates = sorted({s for s in canonical if canonical.count(s) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {', '.join(duplicates)}")
    return canonical


def schedule_notes(specs: Sequence[str], n_tasks: int, epochs: int) -> list[str]:
    """Warnings for methods whose schedule does not fit in ``epochs`` (IGBv1's baseline, IGBv2's policy)."""
    notes = []
    for spec in specs:
        loss = make(spec, n_tasks=n_tasks).loss
        policy_epoch = getattr(loss, "policy_epoch", None)
        base_epoch = getattr(loss, "base_epoch", None)
        if isinstance(policy_epoch, int) and epochs <= policy_epoch:
            notes.append(
                f"{spec}: its policy picks the weights from epoch {policy_epoch + 1}; in {epochs} epochs it used "
                "random weights only"
            )
        elif isinstance(base_epoch, int) and epochs <= base_epoch + 1:
            notes.append(
                f"{spec}: its gap weights start at epoch {base_epoch + 2}; in {epochs} epoch"
                f"{'s' if epochs != 1 else ''} it never used them"
            )
    return notes


#: device types a run can train on (torch knows more, e.g. meta, which holds no data to train with)
TRAINING_DEVICES = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device a run can train on; ValueError (one line) for anything else."""
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1, mps)") from error
    if resolved.type not in TRAINING_DEVICES:
        raise ValueError(f"device {device!r} cannot train a model; use one of {', '.join(TRAINING_DEVICES)}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use --device cpu")
    return resolved


def _versions() -> dict[str, str]:
    return {
        "taskbalance": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _stl_cache_root(benchmark: Benchmark, settings: Settings, data_digest: str) -> Path:
    """The cache folder of the single-task baselines: keyed by the data's content (its manifest digest), not its
    path, so baselines are never reused on other data."""
    protocol = benchmark.protocol
    key = (
        f"{protocol.name}-e{settings.epochs}-b{settings.batch_size}-lr{protocol.lr:g}-n{protocol.train_size or 'all'}"
        f"-data-{data_digest[:10]}-{settings.device.type}-v{STL_CACHE_VERSION}"
    )
    return cache_dir() / "stl" / benchmark.name / key


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_json(path: Path, data: Any) -> None:
    with atomic_open(path) as handle:
        handle.write((json.dumps(data, indent=2) + "\n").encode())


def _previous_config(config_path: Path) -> dict[str, Any]:
    try:
        previous = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ResumeError(f"{config_path} is unreadable ({error}); restore it or use a new --out") from error
    if not isinstance(previous, dict):
        raise ResumeError(f"{config_path} is not a config.json the runner writes; restore it or use a new --out")
    for key in ("methods", "seeds"):
        if not isinstance(previous.get(key), list):
            raise ResumeError(f"{config_path} has no list of {key}; restore it or use a new --out")
    return previous


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder: choose another --out")


def _prepare_out_dir(out_dir: Path, config: dict[str, Any], resume: bool, manifest: dict[str, list[Any]]) -> bool:
    """Check ``out_dir`` against ``config`` (its fingerprint on a resume), then write config.json and the data
    manifest; a resume keeps the methods and seeds the folder already has. True when config.json is new."""
    config_path = out_dir / "config.json"
    _check_out_dir(out_dir)
    fresh = not config_path.exists()
    if not fresh:
        if not resume:
            raise FileExistsError(
                f"{out_dir} already holds a run: continue it with --resume, or choose another folder with --out"
            )
        previous = _previous_config(config_path)
        check_resume(out_dir, previous, config["fingerprint"], manifest, config["data_dir"])
        recorded = previous.get("fingerprint") or {}
        config["methods"] = merged([str(m) for m in previous["methods"]], config["methods"])
        config["seeds"] = merged([int(s) for s in previous["seeds"]], config["seeds"])
        config["fingerprint"]["methods"] = {**recorded.get("methods", {}), **config["fingerprint"]["methods"]}
    elif out_dir.exists() and any(out_dir.iterdir()) and not resume:
        raise FileExistsError(f"{out_dir} exists and is not empty: choose another folder with --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / MANIFEST, manifest)
    _write_json(config_path, config)
    return fresh


def _roll_back(out_dir: Path, created_dir: bool) -> None:
    """Undo a start that failed before any run wrote to ``out_dir`` (missing data, a missing extra): the same
    command must then start afresh, not ask for --resume."""
    if any(p.name not in ("config.json", MANIFEST) for p in out_dir.iterdir()):
        return
    for name in ("config.json", MANIFEST):
        (out_dir / name).unlink(missing_ok=True)
    if created_dir:
        out_dir.rmdir()


def _summarise(
    out: Path, bench: Benchmark, epochs: int, header: dict[str, Any]
) -> tuple[dict[str, Any], dict[int, float]]:
    """results.json's dict from what the run folder holds: every method of its config.json over the seeds whose
    single-task baselines are all finished (a resume that adds or drops methods keeps the finished ones); and per
    seed, the baselines' seconds per epoch summed over the tasks (results.csv's STL rows)."""
    folder = load_run(out)
    stl_found = folder.stl_results()
    seeds = [s for s in folder.config["seeds"] if all(s in stl_found.get(t, {}) for t in bench.tasks)]
    stl = {task: {s: stl_found[task][s] for s in seeds} for task in bench.tasks}
    finals = {m.name: {s: m.finished[s] for s in seeds if s in m.finished} for m in folder.methods}
    finals = {name: runs for name, runs in finals.items() if runs}
    notes = schedule_notes(list(finals), bench.n_tasks, epochs)
    notes += [
        f"{name}: seed{'s' if len(runs) > 1 else ''} {', '.join(map(str, runs))} only"
        for name, runs in finals.items()
        if len(runs) < len(seeds)
    ]
    times = {}
    for seed in seeds:
        total = 0.0
        for task in bench.tasks:
            total += float(stl[task][seed].time_per_epoch_s or 0.0)
        times[seed] = total
    summary_header = {**header, "seeds": seeds, "notes": notes}
    return results_json(summary_header, bench.tasks, bench.metrics, stl, finals), times


def run(
    benchmark: str | Benchmark,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: int | Sequence[int] = 1,
    out_dir: str | Path = "runs/out",
    *,
    epochs: int | None = None,
    protocol: str | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    data_dir: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    command: str | None = None,
    on_step: StepHook | None = None,
    nproc: int = 1,
) -> RunResults:
    """Train the single-task baselines and every method × seed of ``benchmark``; write and return the results.

    Args:
        benchmark: a name from :mod:`.catalog` or a :class:`Benchmark` instance (then ``protocol`` and
            ``data_dir`` must be None: the instance carries them).
        methods: specs for :func:`taskbalance.make` (``"ew"``, ``"igbv1+nashmtl"``, ...).
        seeds: a count N (seeds 0..N−1) or the seeds themselves.
        out_dir: the run folder (must be new unless ``resume``).
        epochs: override the protocol's epoch count (fewer epochs than a full protocol mark the run reduced).
        device: torch device for training and evaluation.
        resume: continue the run folder: finished runs are skipped, unfinished ones continue from their last
            checkpoint. Settings that change the results (benchmark, protocol, epochs, ...) must be the same.
        threads: CPU threads for torch during the run (None: torch's default).
        progress: show progress bars (on stderr).
        command: the command line recorded in config.json.
        on_step: called as ``on_step(job, epoch, step)`` after every optimizer step (monitoring, tests); with
            ``nproc`` > 1, in every rank of the method runs (it must pickle).
        nproc: processes that train each method run together (1: this process alone); see :mod:`.launch`.

    Raises:
        ValueError: bad arguments, unknown benchmark / method / protocol, or settings that differ on resume.
        FileExistsError: ``out_dir`` holds a run and ``resume`` is False.
        CheckpointError: a checkpoint cannot be read (the message says which file to delete).
        DataSourceError / FileNotFoundError: missing data (the message says how to install it).
    """
    if isinstance(benchmark, Benchmark):
        if protocol is not None or data_dir is not None:
            raise ValueError("pass protocol and data_dir to the Benchmark instance, not to run()")
        bench = benchmark
    else:
        bench = make_benchmark(benchmark, protocol=protocol, data_dir=data_dir)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    specs = check_methods(methods, bench.n_tasks)
    seed_list = parse_seeds(seeds)
    settings = Settings(
        epochs=bench.protocol.epochs if epochs is None else epochs,
        batch_size=bench.protocol.batch_size,
        device=resolve_device(device),
        progress=progress,
    )
    check_nproc(nproc, settings.device)
    reduced = bench.protocol.reduced or settings.epochs < bench.protocol.epochs
    description = bench.protocol.description
    if settings.epochs != bench.protocol.epochs:
        description += f" — run for {settings.epochs} epochs instead of {bench.protocol.epochs}"
    out = Path(out_dir)
    _check_out_dir(out)  # before the data: reading (or downloading) it can take a while
    manifest = data_manifest(bench.data_sources())
    check_shards(bench, settings.batch_size, nproc)
    header = {
        "benchmark": bench.name,
        "protocol": bench.protocol.name,
        "protocol_description": description,
        "reduced": reduced,
    }
    config = {
        **header,
        "methods": specs,
        "seeds": seed_list,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "lr": bench.protocol.lr,
        "train_size": bench.protocol.train_size,
        "device": str(settings.device),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "nproc": nproc,
        "data_dir": bench.data_dir,
        "selection_rule": SELECTION_RULE,
        "command": command if command is not None else "taskbalance.benchmarks.runner.run (Python API)",
        "versions": _versions(),
        "tasks": list(bench.tasks),
        "metrics": [{"name": m.name, "task": m.task, "higher_is_better": m.higher_is_better} for m in bench.metrics],
        "fingerprint": fingerprint(
            bench,
            settings.epochs,
            settings.device,
            {s: describe_method(s, bench.n_tasks) for s in specs},
            manifest,
            nproc=nproc,
        ),
    }
    created_dir = not out.exists()
    fresh = _prepare_out_dir(out, config, resume, manifest)
    try:
        _train_all(bench, specs, seed_list, settings, out, resume, threads, on_step, manifest_digest(manifest), nproc)
    except BaseException:
        if fresh:
            _roll_back(out, created_dir)
        raise
    summary_header = {**header, "description": description, "selection_rule": SELECTION_RULE}
    del summary_header["protocol_description"]
    results, stl_time = _summarise(out, bench, settings.epochs, summary_header)
    write_results(out, results, stl_time)
    return RunResults(results, markdown_table(results), out)


def _train_all(
    bench: Benchmark,
    specs: list[str],
    seed_list: list[int],
    settings: Settings,
    out: Path,
    resume: bool,
    threads: int | None,
    on_step: StepHook | None,
    data_digest: str,
    nproc: int = 1,
) -> None:
    """The single-task baselines of every seed (in the cache, linked into ``out``), then every seed × method (on
    ``nproc`` processes when > 1: the baselines are trained here, by this process alone)."""
    stl_root = _stl_cache_root(bench, settings, data_digest)
    jobs = [Job("stl", seed, task) for seed in seed_list for task in range(bench.n_tasks)]
    jobs += [Job(spec, seed) for seed in seed_list for spec in specs]
    stl_val: dict[int, dict[str, float]] = {s: {} for s in seed_list}
    on_ranks: list[tuple[Job, Path, dict[str, float]]] = []
    with torch_threads(threads):
        overall = tqdm(jobs, desc=f"{bench.name} runs", disable=not settings.progress, dynamic_ncols=True)
        for job in overall:
            overall.set_postfix_str(job.label(bench.tasks), refresh=True)
            if job.task is None and nproc > 1:
                run_dir = out / "runs" / method_dir(job.spec) / f"seed{job.seed}"
                trainer = RunTrainer(bench, job, run_dir, settings, reference=stl_val[job.seed])
                if not (resume and trainer.finished()):
                    on_ranks.append((job, run_dir, stl_val[job.seed]))
            elif job.task is not None:
                task = bench.tasks[job.task]
                cached = stl_root / task / f"seed{job.seed}"
                trainer = RunTrainer(bench, job, cached, settings, reference=None, on_step=on_step)
                final = trainer.finished() or trainer.train(resume=True)  # the cache always continues
                for name in _STL_FILES:
                    if (cached / name).exists():
                        _link_or_copy(cached / name, out / "stl" / task / f"seed{job.seed}" / name)
                stl_val[job.seed].update(final["val"])
            else:
                run_dir = out / "runs" / method_dir(job.spec) / f"seed{job.seed}"
                trainer = RunTrainer(bench, job, run_dir, settings, reference=stl_val[job.seed], on_step=on_step)
                if not (resume and trainer.finished()):
                    trainer.train(resume=resume)
        overall.close()
        if on_ranks:
            per_rank = max(1, (threads if threads is not None else torch.get_num_threads()) // nproc)
            train_on_ranks(bench, on_ranks, settings, nproc, resume=resume, threads=per_rank, on_step=on_step)
