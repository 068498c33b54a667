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


def train(spec: str, rank: int, world: int, wrap_ddp: bool = False, **options: Any) -> dict[str, Tensor]:
    """STEPS steps of SGD on this rank's shard of each global batch; the model's and the balancer's final state.

    The balancer is built after seeding with the rank: methods seeded from the global RNG start apart on each
    rank, so equal results show that rank 0's state was taken.
    """
    torch.manual_seed(1000 + rank)
    model = TinyMTL(n_tasks=N_TASKS, seed=0)
    balancer = tb.make(spec, n_tasks=N_TASKS, **options)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if wrap_ddp else model
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    shard = GLOBAL_BATCH // world
    for step, (x, y) in enumerate(batches()):
        xs, ys = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        optimizer.zero_grad()
        features, losses = losses_of(net, xs, ys)
        balancer.backward(losses, model.encoder.parameters(), features=features)
        optimizer.step()
        with torch.no_grad():
            balancer.after_step(losses_of(net, xs, ys)[1])
        if step % 5 == 4:
            balancer.end_epoch()
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update(flat_state(balancer.state_dict(), "balancer."))
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
    "igbv1+nashmtl",
    "igbv2+cagrad",
]


def train_all(rank: int, world: int, specs: tuple[str, ...] = tuple(SPECS), **options: Any) -> dict[str, Any]:
    """:func:`train` for each spec (one group for all: a spawn costs seconds)."""
    return {spec: train(spec, rank, world, **options) for spec in specs}
