"""What each rank of the multi-process tests runs (spawned processes import this module, not the test file)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import taskbalance as tb
from tests.models import TinyMTL

N_TASKS = 3
STEPS = 20
GLOBAL_BATCH = 16


def batches(steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    """The global batches of a run: the same on every rank (each takes its shard)."""
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(GLOBAL_BATCH, 5, generator=gen), torch.randn(GLOBAL_BATCH, N_TASKS, generator=gen))
        for _ in range(steps)
    ]


def losses_of(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    features, outputs = model(x)
    losses = torch.stack([(k + 1.0) * (out - y[:, k]).pow(2).mean() + 0.1 for k, out in enumerate(outputs)])
    return features, losses


def train(
    spec: str,
    rank: int,
    world: int,
    wrap_ddp: bool = False,
    micro_batches: int = 1,
    scaled: bool = False,
    **options: Any,
) -> dict[str, Tensor]:
    """STEPS steps of SGD on this rank's shard of each global batch; the model's and the balancer's final state.

    The balancer is built after seeding with the rank: methods seeded from the global RNG start apart on each
    rank, so equal results show that rank 0's state was taken. ``micro_batches`` > 1 accumulates the shard in
    that many micro-batches (``accumulate=True`` on all but the last). ``scaled``: through a GradScaler whose
    scale grows every 4 steps, with an overflowing loss at step 9 (a skipped step on every rank).
    """
    torch.manual_seed(1000 + rank)
    model = TinyMTL(n_tasks=N_TASKS, seed=0)
    balancer = tb.make(spec, n_tasks=N_TASKS, **options)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if wrap_ddp else model
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=4) if scaled else None
    shard = GLOBAL_BATCH // world
    micro = shard // micro_batches
    for step, (x, y) in enumerate(batches()):
        xs, ys = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        optimizer.zero_grad()
        for i in range(micro_batches):
            part = slice(i * micro, (i + 1) * micro)
            features, losses = losses_of(net, xs[part], ys[part])
            if scaled and step == 9 and rank == world - 1:  # the last rank's gradient overflows
                losses = losses + 0.0 * torch.sqrt(features.sum() - features.sum().detach())
            balancer.backward(
                losses, model.encoder.parameters(), features=features, accumulate=i < micro_batches - 1, scaler=scaler
            )
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        with torch.no_grad():
            balancer.after_step(losses_of(net, xs, ys)[1])
        if step % 5 == 4:
            balancer.end_epoch()
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update(flat_state(balancer.state_dict(), "balancer."))
    if scaler is not None:
        state["scale"] = torch.tensor(scaler.get_scale(), dtype=torch.float64)
    return state


def flat_state(value: Any, prefix: str) -> dict[str, Tensor]:
    """Every tensor (and number) of a nested state, by a dotted path: what two ranks must hold alike."""
    out: dict[str, Tensor] = {}
    if isinstance(value, Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, torch.Generator):
        out[prefix] = value.get_state()
    elif isinstance(value, dict):
        for k, v in value.items():
            out.update(flat_state(v, f"{prefix}{k}."))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(flat_state(v, f"{prefix}{i}."))
    elif isinstance(value, (int, float, bool)):
        out[prefix] = torch.tensor(float(value), dtype=torch.float64)
    return out


def run_ranks(rank: int, world: int, port: int, out: str, job: Callable[[int, int], dict[str, Any]]) -> None:
    """The body of one spawned rank: join the group, run ``job``, save what it returns as ``out``/rank<r>.pt."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(job(rank, world), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


#: every method of the issue's list, and two compositions
SPECS = [
    *[
        "ew",
        "si",
        "uw",
        "dwa",
        "famo",
        "igbv1",
        "igbv2",
        "dbmtl",
        "nashmtl",
        "upgrad",
        "cagrad",
        "imgrad",
        "mgda",
        "pcgrad",
        "graddrop",
    ],
    "igbv1+nashmtl",
    "igbv2+cagrad",
    # IGBv2 whose agent trains from the 2nd epoch (5 steps) and whose policy acts from the 3rd
    "igbv2[base_epoch=0,train_epoch=1,policy_epoch=2,update_every=2,batch_size=4]",
]

#: (label, spec, options of train) of one run
Run = tuple[str, str, dict[str, Any]]


def train_runs(rank: int, world: int, runs: tuple[Run, ...]) -> dict[str, Any]:
    """:func:`train` for each run (one process group for all: a spawn costs seconds)."""
    return {label: train(spec, rank, world, **options) for label, spec, options in runs}


def refusals(rank: int, world: int) -> dict[str, str]:
    """What each rank is told when the ranks disagree (each case must raise on every rank, never hang)."""
    told: dict[str, str] = {}
    x, y = batches(1)[0]

    def attempt(case: str, balancer: tb.Balancer, model: TinyMTL, shared: list[nn.Parameter], losses: Tensor) -> None:
        try:
            balancer.backward(losses, shared)
        except ValueError as error:
            told[case] = str(error)

    model = TinyMTL(n_tasks=N_TASKS, seed=0)
    everything = list(model.encoder.parameters())
    shared = everything if rank == 0 else everything[:2]
    attempt("shared", tb.make("mgda", n_tasks=N_TASKS), model, shared, losses_of(model, x, y)[1])
    balancer = tb.make(f"igbv1[base_epoch={1 + rank}]", n_tasks=N_TASKS)
    attempt("options", balancer, model, everything, losses_of(model, x, y)[1])
    losses = losses_of(model, x, y)[1]
    if rank == 1:
        losses = losses * torch.tensor([1.0, float("nan"), 1.0])
    attempt("nan", tb.make("nashmtl", n_tasks=N_TASKS), model, everything, losses)
    return told
