"""A comparison's method runs trained by N local processes (``taskbalance run --nproc N``).

The calling process checks everything, trains the single-task baselines alone (they are shared with one-process
runs through the cache) and then starts N ranks through PyTorch's elastic launcher (the machinery behind
``torchrun``: a c10d rendezvous on a free local port, no restarts), gloo on the CPU and NCCL on CUDA (rank r on
``cuda:r``). Each rank receives the benchmark (pickled, data included when it is loaded already) and the list of
runs still to train, and trains them in order (:mod:`.training`): its share of every global batch, the Balancer
balancing the global batch, rank 0 alone evaluating and writing. Each rank gets ``threads // N`` torch threads (at
least one), so N ranks use the threads one process would.

A rank that raises stops every rank (the launcher terminates the others); its exception comes back to the caller
as itself, caused by a :class:`RankTraceback` that shows where the rank raised it, so that a user's mistake (a
corrupt checkpoint) stays one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import tempfile
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..base import Benchmark
from ..batches import Batches
from .training import COLLECTIVE_TIMEOUT, Job, RunTrainer, Settings, StepHook

#: loggers of the launcher that report a failed rank at length; the caller re-raises the rank's own exception
_LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing.spawn")


def check_nproc(nproc: int, device: torch.device) -> None:
    """Refuse a process count this machine cannot run (before any work): 1 ≤ N ≤ the CPU count on the CPU, the
    CUDA device count on CUDA; N > 1 needs torch.distributed and the CPU or every GPU from cuda:0."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if nproc == 1:
        return
    if not torch.distributed.is_available():
        raise ValueError(f"--nproc {nproc} needs torch.distributed, which this torch build lacks; use --nproc 1")
    if device.type == "cpu":
        cpus = os.cpu_count() or 1
        if nproc > cpus:
            raise ValueError(f"--nproc {nproc} exceeds this machine's {cpus} CPU(s)")
    elif device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--nproc {nproc} trains on cuda:0 … cuda:{nproc - 1}: pass --device cuda, not {device}")
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise ValueError(f"--nproc {nproc} exceeds the {gpus} CUDA device(s) of this machine (one process each)")
    else:
        raise ValueError(f"--nproc {nproc} runs on cpu (gloo) or cuda (NCCL), not on {device.type}")


def check_shards(bench: Benchmark, batch_size: int, nproc: int) -> None:
    """Refuse a benchmark whose global batches cannot be split into ``nproc`` shards: the batch size must be a
    multiple of N, the training loader a :class:`~..batches.Batches`, and the last batch hold N samples or more."""
    if nproc == 1:
        return
    if batch_size % nproc:
        raise ValueError(
            f"--nproc {nproc} does not divide the global batch of {batch_size} samples into equal shards; "
            "choose an --nproc that divides it"
        )
    loader = bench.loader("train", batch_size=batch_size, shuffle=True, generator=torch.Generator())
    if not isinstance(loader, Batches):
        raise ValueError(
            f"{bench.name}'s training loader ({type(loader).__name__}) is not a taskbalance Batches, which "
            f"--nproc needs to shard every batch; use --nproc 1"
        )
    smallest = min(loader.batch_sizes(), default=0)
    if smallest < nproc:
        raise ValueError(
            f"the last training batch of {bench.name} holds {smallest} samples, fewer than --nproc {nproc}"
        )


class RankTraceback(Exception):
    """The traceback of an exception a rank raised, as the cause of that exception re-raised in the caller."""


@dataclass(frozen=True)
class RankPlan:
    """What every rank trains: ``runs`` (job, run folder, validation reference) in order, with ``settings``
    (rank 0's device and progress; each rank sets its own), ``threads`` torch threads per rank."""

    benchmark: Benchmark
    runs: Sequence[tuple[Job, Path, dict[str, float]]]
    settings: Settings
    resume: bool
    threads: int
    on_step: StepHook | None
    errors: Path


def train_on_ranks(
    benchmark: Benchmark,
    runs: Sequence[tuple[Job, Path, dict[str, float]]],
    settings: Settings,
    nproc: int,
    *,
    resume: bool,
    threads: int,
    on_step: StepHook | None = None,
) -> None:
    """Train ``runs`` on ``nproc`` local processes (see the module docstring); return when every rank is done."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="taskbalance-ranks-") as folder:
        errors = Path(folder)
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{_free_port()}",
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=str(errors / "logs")),
        )
        plan = RankPlan(benchmark, list(runs), replace(settings, world=nproc), resume, threads, on_step, errors)
        try:
            with _quiet(_LAUNCHER_LOGGERS):
                elastic_launch(config, _rank_main)(plan)
        except ChildFailedError as failure:
            first, _ = failure.get_first_failure()
            error, where = _rank_error(errors, first, nproc)
            if error is None:
                raise RuntimeError(f"a training process failed without a Python exception:\n{failure}") from None
            raise error from where


def _rank_main(plan: RankPlan) -> None:
    """One rank: join the group the launcher set up (its environment), train every run of the plan, leave."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        import torch.distributed as dist

        device = plan.settings.device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.set_num_threads(plan.threads)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        try:
            settings = replace(
                plan.settings, device=device, rank=rank, world=world, progress=plan.settings.progress and rank == 0
            )
            runs = tqdm(
                plan.runs,
                desc=f"{plan.benchmark.name} runs on {world} processes",
                disable=not settings.progress,
                dynamic_ncols=True,
            )
            for job, run_dir, reference in runs:
                runs.set_postfix_str(job.label(plan.benchmark.tasks), refresh=True)
                RunTrainer(plan.benchmark, job, run_dir, settings, reference, plan.on_step).train(resume=plan.resume)
            runs.close()
        finally:
            dist.destroy_process_group()
    except BaseException as error:
        _record(plan.errors / f"rank{rank}.pickle", error)
        raise


def _record(path: Path, error: BaseException) -> None:
    """Leave ``error`` and its traceback for the caller (a stand-in when the exception does not pickle)."""
    text = "".join(traceback.format_exception(error))
    try:
        data = pickle.dumps((error, text))
    except Exception:  # an exception holding something unpicklable: its type and message still go back
        data = pickle.dumps((RuntimeError(f"{type(error).__name__}: {error}"), text))
    path.write_bytes(data)


def _rank_error(errors: Path, first: int, nproc: int) -> tuple[BaseException | None, RankTraceback | None]:
    """The exception the first failing rank raised (by the launcher's clock), else the lowest rank's that was
    recorded, with where it was raised; (None, None) when no rank recorded one."""
    for rank in [first, *range(nproc)]:
        path = errors / f"rank{rank}.pickle"
        if path.exists():
            error, text = pickle.loads(path.read_bytes())  # written by our own ranks into our private folder
            if isinstance(error, BaseException):
                return error, RankTraceback(f"raised on rank {rank} of {nproc}:\n{text}")
    return None, None


def _free_port() -> int:
    """A TCP port free on the loopback interface now (the rendezvous binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    """Silence ``names``' loggers below CRITICAL for the block (their levels restored after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
