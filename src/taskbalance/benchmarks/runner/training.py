"""One training run of a benchmark: a balancing method (or a single-task baseline) with one seed.

Determinism: the model is initialised right after ``torch.manual_seed(seed)``, so every run of a seed starts
from the same weights; the training batches come in an order drawn from a generator seeded with the seed, so
every run of a seed sees the same batches; dropout then draws from torch's global RNG, re-seeded from the seed
after the balancer is built. At the end of every epoch the run validates, tests, appends to its files and writes
a checkpoint; a run continued from its checkpoint (``resume=True``) ends bit for bit where an uninterrupted one
would (on the CPU, with the same thread count).

Files in the run folder: ``metrics.jsonl`` (one line per finished epoch: training seconds, learning rate, the
mean over the epoch's batches of each raw training loss, validation and test metrics), ``weights.csv`` (effective
task weights at up to 50 evenly spaced steps per epoch), ``checkpoint.pt`` and, once the last epoch is done,
``final.json``. Every file is replaced atomically (``weights.csv`` too, rewritten whole each epoch), so a kill
never leaves a torn line; a resume cuts ``weights.csv`` back to the checkpoint's epoch and step.

On a process group (``Settings.world`` > 1, see :mod:`.launch`) every rank runs the same loop on its share of each
global batch (:meth:`~..batches.Batches.shards`) and the Balancer balances the global batch. Only rank 0 evaluates
and writes files; it sends every epoch's record to the others (a metric-driven scheduler steps alike on every
rank). Each rank draws dropout from its own stream (rank 0's is the one-process stream), and the checkpoint holds
every rank's RNG state. A last batch shared unequally is weighted so that the mean over ranks is the global mean.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ...balancer import Balancer
from ...loss_balancing.base import LossBalancer
from ..base import Benchmark, Split
from ..batches import Batches, Shard
from ..datasets.cache import atomic_open
from ..metrics.delta_m import delta_m
from ..report.folder import parse_weights_row, read_final
from .checkpoint import CheckpointError, load_checkpoint, restore_rng, rng_state, save_checkpoint
from .fingerprint import build_balancer

#: offset of the dropout stream's seed from the run seed (any constant: it only has to differ from the init's)
_DROPOUT_STREAM = 1_000_003
#: offset between the dropout streams of consecutive ranks (rank 0's is the one-process stream)
_RANK_STREAM = 7_919
#: how long a rank waits in a collective: the others wait while rank 0 evaluates, which may take long
COLLECTIVE_TIMEOUT = timedelta(hours=2)
#: the at most this many weight rows per epoch go to weights.csv (every step when an epoch is shorter)
WEIGHT_SAMPLES_PER_EPOCH = 50
#: progress-bar postfix refresh period in steps (reading the loss values synchronises a GPU)
_POSTFIX_EVERY = 10

SELECTION_RULE = (
    "test metrics at the epoch with the lowest validation Δm% against the single-task baselines of the same seed "
    "(ties: the earliest); a single-task baseline takes its epoch by the same rule against its own first epoch, "
    "i.e. its best validation metric"
)

StepHook = Callable[["Job", int, int], None]


@dataclass(frozen=True)
class Job:
    """One run: ``spec`` (a method spec) with ``seed``, or the single-task baseline of ``task`` when set."""

    spec: str
    seed: int
    task: int | None = None

    @property
    def is_stl(self) -> bool:
        return self.task is not None

    def label(self, tasks: tuple[str, ...]) -> str:
        name = f"stl:{tasks[self.task]}" if self.task is not None else self.spec
        return f"{name} seed {self.seed}"


@dataclass(frozen=True)
class Settings:
    """How runs are trained: epochs, batch size and device (from the protocol and the user's overrides)."""

    epochs: int
    batch_size: int
    device: torch.device
    progress: bool = True
    #: this process's rank and the number of processes training each run together (1: no process group)
    rank: int = 0
    world: int = 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run folder (rank 0 alone)."""
        return self.rank == 0


def uses_after_step(balancer: Balancer) -> bool:
    """Whether the loss method reads post-step losses (FAMO); only then pay the extra forward they cost."""
    return type(balancer.loss).after_step is not LossBalancer.after_step


def selection_score(
    val: Mapping[str, float], reference: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> float:
    """Validation Δm% against ``reference`` (lower is better); +inf when undefined, so such an epoch never wins."""
    score = delta_m(val, reference, higher_is_better, skip_zero_reference=True)
    return score if math.isfinite(score) else math.inf


def best_epoch(
    history: list[dict[str, Any]],
    higher_is_better: Mapping[str, bool],
    reference: Mapping[str, float] | None,
) -> dict[str, Any]:
    """The epoch record with the lowest validation Δm% against ``reference`` (the first epoch's when None)."""
    if not history:
        raise ValueError("no finished epoch to select from")
    ref = history[0]["val"] if reference is None else reference
    scores = [selection_score(record["val"], ref, higher_is_better) for record in history]
    return history[min(range(len(history)), key=lambda i: (scores[i], i))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text.encode())


def _truncate_weights(path: Path, last_epoch: int, last_step: int) -> None:
    """Keep the header and the rows of the checkpointed epochs and steps: a crash may have left rows of an
    unfinished epoch, and a runner before atomic rewrites a torn last line (dropped here, never parsed)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    width = len(lines[0].split(",")) if lines else 0
    kept = lines[:1]
    for line in lines[1:]:
        row = parse_weights_row(line.split(","), width)
        if row is not None and row[1] <= last_epoch and row[0] <= last_step:
            kept.append(line)
    _write_text(path, "\n".join(kept) + "\n")


class RunTrainer:
    """Trains one :class:`Job` of ``benchmark`` into ``run_dir`` (see the module docstring).

    ``reference``: the validation metrics the best epoch is chosen against (the same seed's single-task
    baselines for a method; None for a baseline, which compares with its own first epoch). ``on_step(job,
    epoch, step)`` is called after every optimizer step (epoch and step 1-based); an exception it raises stops
    the run as a crash would.
    """

    def __init__(
        self,
        benchmark: Benchmark,
        job: Job,
        run_dir: Path,
        settings: Settings,
        reference: Mapping[str, float] | None = None,
        on_step: StepHook | None = None,
    ) -> None:
        self.benchmark, self.job, self.run_dir, self.settings = benchmark, job, run_dir, settings
        self.reference, self.on_step = reference, on_step
        tasks = benchmark.tasks
        self.tasks = tasks if job.task is None else (tasks[job.task],)
        self.metrics = {m.name: m.higher_is_better for m in benchmark.metrics if m.task in self.tasks}
        if not self.metrics:
            raise ValueError(f"{benchmark.name} has no metric for task(s) {', '.join(self.tasks)}")

    # -- files -------------------------------------------------------------------------------------------------
    @property
    def final_path(self) -> Path:
        return self.run_dir / "final.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def finished(self) -> dict[str, Any] | None:
        """The run's final.json when it completed, else None (also when it is unreadable or not what the runner
        writes: training then picks up from the checkpoint, which after the last epoch only rewrites final.json)."""
        try:
            final: dict[str, Any] = json.loads(self.final_path.read_text())
            read_final(self.final_path, self.job.seed)
        except (OSError, ValueError):
            return None
        return final

    # -- training ------------------------------------------------------------------------------------------------
    def train(self, resume: bool) -> dict[str, Any]:
        """Train (or continue, with ``resume``, from the checkpoint) to the last epoch; return final.json's dict."""
        bench, job, device = self.benchmark, self.job, self.settings.device
        rank, world, writes = self.settings.rank, self.settings.world, self.settings.writes
        if writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(job.seed)
        model = bench.model()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{bench.name}.model() must return an nn.Module")
        model_module: torch.nn.Module = model
        model_module.to(device)
        shared = list(model.encoder.parameters())
        balancer = None if job.is_stl else build_balancer(job.spec, bench.n_tasks).to(device)
        torch.manual_seed(job.seed + _DROPOUT_STREAM + rank * _RANK_STREAM)
        params = [*model_module.parameters(), *(balancer.parameters() if balancer is not None else ())]
        optimizer = bench.optimizer(params)
        scheduler = bench.scheduler(optimizer)
        order = torch.Generator().manual_seed(job.seed)
        state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}

        if resume and self.checkpoint_path.exists():
            saved = load_checkpoint(self.checkpoint_path, device)
            fix = f"delete {self.checkpoint_path} (the run then restarts from its first epoch)"
            expected = {"spec": job.spec, "seed": job.seed, "task": job.task}
            if saved.get("job") != expected:
                raise CheckpointError(f"{self.checkpoint_path} belongs to {saved.get('job')}, not {expected}; {fix}")
            try:
                model_module.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                if scheduler is not None and saved.get("scheduler") is not None:
                    scheduler.load_state_dict(saved["scheduler"])
                if balancer is not None:
                    balancer.load_state_dict(saved["balancer"])
                restore_rng(saved["rng"] if world == 1 else _rank_rng(saved, rank, world), device)
                order.set_state(saved["order"].cpu())
            except (RuntimeError, ValueError, KeyError, TypeError) as error:
                raise CheckpointError(f"{self.checkpoint_path} does not fit this run ({error}); {fix}") from error
            state = {"epoch": int(saved["epoch"]), "step": int(saved["step"]), "history": list(saved["history"])}
        if writes:
            self._rewrite_metrics(state["history"])
            _truncate_weights(self.run_dir / "weights.csv", state["epoch"], state["step"])
            if state["epoch"] == 0:
                _write_text(self.run_dir / "weights.csv", "step,epoch," + ",".join(self.benchmark.tasks) + "\n")

        for epoch in range(state["epoch"] + 1, self.settings.epochs + 1):
            record = self._epoch(epoch, state, model_module, shared, balancer, optimizer, order)
            rank_rngs = None if world == 1 else _all_gather(rng_state(device))
            if writes:
                record["val"] = self._evaluate(model_module, "val")
                record["test"] = self._evaluate(model_module, "test")
            if world > 1:
                record = _from_rank0(record)
            if scheduler is not None:
                bench.step_scheduler(scheduler, record["val"])
            state["history"].append(record)
            state["epoch"] = epoch
            if not writes:
                continue
            self._rewrite_metrics(state["history"])
            save_checkpoint(
                self.checkpoint_path,
                {
                    "epoch": epoch,
                    "step": state["step"],
                    "model": model_module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "balancer": None if balancer is None else balancer.state_dict(),
                    "rng": rng_state(device),
                    **({} if rank_rngs is None else {"rank_rng": rank_rngs}),
                    "order": order.get_state(),
                    "history": state["history"],
                    "job": {"spec": job.spec, "seed": job.seed, "task": job.task},
                },
            )
        final = self._final(state["history"])
        if writes:
            _write_text(self.final_path, json.dumps(final, indent=2) + "\n")
        return final

    def _epoch(
        self,
        epoch: int,
        state: dict[str, Any],
        model: torch.nn.Module,
        shared: list[torch.nn.Parameter],
        balancer: Balancer | None,
        optimizer: torch.optim.Optimizer,
        order: torch.Generator,
    ) -> dict[str, Any]:
        bench, job, device = self.benchmark, self.job, self.settings.device
        world = self.settings.world
        loader = bench.loader("train", batch_size=self.settings.batch_size, shuffle=True, generator=order)
        n_steps = len(loader) if isinstance(loader, Sized) else None
        shards = _shards(loader, self.settings.rank, world)
        every = 1 if n_steps is None else max(1, n_steps // WEIGHT_SAMPLES_PER_EPOCH)
        after_step = balancer is not None and uses_after_step(balancer)
        lr = float(optimizer.param_groups[0]["lr"])
        one_hot = None
        if job.task is not None:
            one_hot = torch.zeros(bench.n_tasks, device=device)
            one_hot[job.task] = 1.0
        loss_sum = torch.zeros(bench.n_tasks, dtype=torch.float64, device=device)
        sampled: list[Tensor] = []
        sampled_steps: list[int] = []
        overhead, steps = 0.0, 0
        model.train()
        _sync(device)
        start = time.perf_counter()
        bar = tqdm(
            shards,
            total=n_steps,
            desc=f"{job.label(bench.tasks)} epoch {epoch}/{self.settings.epochs}",
            leave=False,
            disable=not self.settings.progress,
            dynamic_ncols=True,
        )
        for shard in bar:
            inputs, targets = bench.to_device(shard.batch, device)
            features, outputs = model(inputs)
            losses = bench.losses(outputs, targets)
            weight = shard.weight(world)
            if weight != 1.0:
                losses = losses * weight
            if balancer is None:
                assert one_hot is not None and job.task is not None
                torch.autograd.backward(losses[job.task])
                weights, seen = one_hot, losses
            else:
                result = balancer.backward(losses, shared_params=shared, features=features)
                weights = result.weights
                overhead += result.overhead_s
                # on a process group: the global batch's losses the balancer gathered, the same on every rank
                seen = losses if world == 1 else result.losses
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step:
                assert balancer is not None
                with torch.no_grad():
                    after = bench.losses(model(inputs)[1], targets)
                    balancer.after_step(after if weight == 1.0 else after * weight)
            loss_sum += seen.detach().double()
            if steps % every == 0:
                sampled.append(weights.detach())
                sampled_steps.append(state["step"] + 1)
            steps += 1
            state["step"] += 1
            if self.settings.progress and steps % _POSTFIX_EVERY == 0:
                bar.set_postfix_str(self._postfix(loss_sum / steps), refresh=False)
            if self.on_step is not None:
                self.on_step(job, epoch, steps)
        bar.close()
        if balancer is not None:
            balancer.end_epoch()
        _sync(device)
        seconds = time.perf_counter() - start
        if steps == 0:
            raise ValueError(f"{bench.name}: the training loader yielded no batch")
        mean_losses = (loss_sum / steps).tolist()
        if self.settings.writes:
            self._append_weights(sampled_steps, sampled, epoch)
        train_tasks = bench.tasks if job.task is None else (bench.tasks[job.task],)
        task_index = {t: i for i, t in enumerate(bench.tasks)}
        return {
            "epoch": epoch,
            "time_s": seconds,
            "lr": lr,
            "train": {f"loss/{t}": float(mean_losses[task_index[t]]) for t in train_tasks},
            "steps": steps,
            "balancing_overhead_s": overhead,
        }

    @torch.no_grad()
    def _evaluate(self, model: torch.nn.Module, split: Split) -> dict[str, float]:
        bench, device = self.benchmark, self.settings.device
        model.eval()
        evaluator = bench.evaluator()
        generator = torch.Generator().manual_seed(self.job.seed)  # unused without shuffling; the contract wants one
        for batch in bench.loader(split, batch_size=self.settings.batch_size, shuffle=False, generator=generator):
            inputs, targets = bench.to_device(batch, device)
            _, outputs = model(inputs)
            evaluator.update(outputs, targets)
        model.train()
        values = evaluator.compute()
        missing = [name for name in self.metrics if name not in values]
        if missing:
            raise ValueError(f"{bench.name}'s evaluator did not report {', '.join(missing)}")
        return {name: float(values[name]) for name in self.metrics}

    def _postfix(self, mean_losses: Tensor) -> str:
        names = self.benchmark.tasks if self.job.task is None else self.tasks
        values = mean_losses.tolist() if self.job.task is None else [mean_losses[self.job.task].item()]
        return " ".join(f"{n} {v:.3f}" for n, v in zip(names, values, strict=True))

    def _append_weights(self, steps: list[int], weights: list[Tensor], epoch: int) -> None:
        if not weights:
            return
        rows = torch.stack(weights).double().cpu().tolist()  # one transfer per epoch, not one per step
        lines = "".join(
            f"{step},{epoch}," + ",".join(repr(float(w)) for w in row) + "\n"
            for step, row in zip(steps, rows, strict=True)
        )
        path = self.run_dir / "weights.csv"
        head = path.read_text() if path.exists() else "step,epoch," + ",".join(self.benchmark.tasks) + "\n"
        _write_text(path, head + lines)  # rewritten whole and atomically: a kill never tears a line

    def _rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        _write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))

    def _final(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        best = best_epoch(history, self.metrics, self.reference)
        total_steps = sum(int(record["steps"]) for record in history)
        final: dict[str, Any] = {
            "method": "stl" if self.job.is_stl else self.job.spec,
            "seed": self.job.seed,
            "best_epoch": best["epoch"],
            "val": best["val"],
            "test": best["test"],
            "time_per_epoch_s": sum(float(r["time_s"]) for r in history) / len(history),
            "balancing_overhead_s_per_step": sum(float(r["balancing_overhead_s"]) for r in history)
            / max(total_steps, 1),
            "epochs": len(history),
            "selection": SELECTION_RULE,
        }
        if self.job.task is not None:
            final["task"] = self.benchmark.tasks[self.job.task]
        return final


def _shards(loader: Iterable[Any], rank: int, world: int) -> Iterator[Shard[Any]]:
    """The batches this process trains on: every batch whole, or on a process group its rank's share."""
    if world == 1:
        for batch in loader:
            yield Shard(batch, 1, 1)
        return
    if not isinstance(loader, Batches):
        raise ValueError(f"the training loader ({type(loader).__name__}) is not a Batches: it cannot be sharded")
    yield from loader.shards(rank, world)


def _all_gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value``, on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank_rng(saved: Mapping[str, Any], rank: int, world: int) -> Any:
    """This rank's RNG state in a checkpoint of a ``world``-process run."""
    states = saved["rank_rng"]
    if not isinstance(states, list) or len(states) != world:
        raise ValueError(f"the checkpoint holds no RNG state for each of {world} processes")
    return states[rank]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` CPU threads (unchanged when None), restoring the previous count."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
