"""Step time on a process group: every balancer against EW under PyTorch's DistributedDataParallel.

    python bench/distributed.py [--nproc 2] [--steps 30] [--repeats 3] [--methods ew,igbv1,nashmtl]

Spawns ``--nproc`` CPU processes (gloo, one torch thread each) that train MultiLeNet (the MultiMNIST model, 2
tasks, batch 256 split over the ranks) on random 28 × 28 inputs. Each rank times full training steps (forward,
backward or ``balancer.backward``, optimizer step) of every configuration round-robin, ``--steps`` steps per
turn, ``--repeats`` turns; the table reports rank 0's median step and the ratio to the reference measured in the
same turns: EW as users run it without taskbalance, ``DistributedDataParallel(model)`` and ``sum(losses).backward()``.

What crosses the ranks per step (floats; P shared, P_h head parameters, K tasks): DDP's EW P + P_h; a loss method
K + 5 (the losses) + P + P_h; an exact gradient method K + 5 + K·P + P_h; ``distributed="local"`` K + 5 + P + P_h.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.benchmarks.models.multilenet import MultiLeNet

BATCH = 256
DEFAULT = "ew,igbv1,igbv2,dbmtl,nashmtl,nashmtl:local,upgrad,igbv1+nashmtl"


def _losses(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    features, logits = model(x)
    return features, torch.stack([nn.functional.cross_entropy(out, y[:, k]) for k, out in enumerate(logits)])


class _Config:
    """One configuration: a model (DDP-wrapped for the reference), its optimizer, and the step."""

    def __init__(self, label: str) -> None:
        torch.manual_seed(0)
        self.label = label
        self.model = MultiLeNet(dropout=0.0)
        self.reference = label == "ddp-ew"
        self.net: nn.Module = nn.parallel.DistributedDataParallel(self.model) if self.reference else self.model
        spec, _, mode = label.partition(":")
        self.balancer = None if self.reference else tb.make(spec, n_tasks=2, distributed=mode or "exact")
        extra = [] if self.balancer is None else list(self.balancer.parameters())
        self.optimizer = torch.optim.SGD([*self.model.parameters(), *extra], lr=0.01)

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad()
        features, losses = _losses(self.net, x, y)
        if self.balancer is None:
            losses.sum().backward()
        else:
            self.balancer.backward(losses, self.model.encoder.parameters(), features=features)
        self.optimizer.step()


def _rank(rank: int, world: int, port: int, out: str, labels: list[str], steps: int, repeats: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    shard = BATCH // world
    x, y = torch.randn(shard, 1, 28, 28, generator=gen), torch.randint(0, 10, (shard, 2), generator=gen)
    configs = [_Config(label) for label in ["ddp-ew", *labels]]
    times: dict[str, list[float]] = {c.label: [] for c in configs}
    for config in configs:  # warm-up: the first steps allocate buffers and align the ranks
        for _ in range(3):
            config.step(x, y)
    for _ in range(repeats):
        for config in configs:
            dist.barrier()
            for _ in range(steps):
                start = time.perf_counter()
                config.step(x, y)
                times[config.label].append(time.perf_counter() - start)
    if rank == 0:
        torch.save(times, Path(out) / "times.pt")
    dist.destroy_process_group()


def _floats(label: str, n_tasks: int, shared: int, heads: int) -> int:
    spec, _, mode = label.partition(":")
    if label == "ddp-ew":
        return shared + heads
    balancer = tb.make(spec, n_tasks=n_tasks)
    exact = balancer.gradient.needs != "nothing" and mode != "local"
    return n_tasks + 5 + (n_tasks * shared if exact else shared) + heads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=DEFAULT)
    args = parser.parse_args(argv)
    labels = args.methods.split(",")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        job = functools.partial(_rank, labels=labels, steps=args.steps, repeats=args.repeats)
        mp.spawn(job, args=(args.nproc, port, out), nprocs=args.nproc)
        times: dict[str, list[float]] = torch.load(Path(out) / "times.pt")
    model = MultiLeNet()
    shared = sum(p.numel() for p in model.encoder.parameters())
    heads = sum(p.numel() for p in model.parameters()) - shared
    reference = statistics.median(times["ddp-ew"])
    print(
        f"{args.nproc} processes (gloo, 1 thread each), MultiLeNet, global batch {BATCH}; P = {shared}, P_h = {heads}"
    )
    print("| configuration | median step (ms) | × DDP EW | floats exchanged per step |")
    print("|---|---|---|---|")
    for label, samples in times.items():
        median = statistics.median(samples)
        row: list[Any] = [
            label,
            f"{1e3 * median:.1f}",
            f"{median / reference:.2f}",
            f"{_floats(label, 2, shared, heads):,}",
        ]
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
