"""Speed of the engine's paths: median ms per training step, and the ratio to an EW step, on three models.

    python bench/engine_paths.py [--repeats 21] [--threads 1] [--device cpu]

A step is what a training loop runs: forward, ``Balancer.backward`` (with a fixed-weight gradient method, so the
solver costs nothing and only the engine is measured), ``zero_grad``. On CPU the clock is the process's CPU time
(steadier than wall time on a machine shared with other jobs), on CUDA wall time with synchronisation.

EW is the same step with ``Balancer(n_tasks=K)``: one ordinary backward of Σ ℓ̃. "raw loop" and "raw batched" are
the per-task gradients alone, by plain ``torch.autograd.grad`` calls (K calls; one ``is_grads_batched`` call),
with nothing applied: the usual ways to get J. "vs floor" divides by the cheapest exact computation of the K
per-task gradients measured here (raw rows and the engine's exact paths), the floor the speed targets refer to.
Paths are timed round-robin (one step of each in turn, repeated) so that a slow spell hits all of them alike.

Models (CPU-sized): an MLP 64→512→512→512 on batches of 256 (K = 2); a CNN, two 3×3 convolutions (32, 64
channels) with BatchNorm in train mode, on 32×32 images in batches of 32 (K = 3); an MLP 64→256→256→256 on
batches of 128 with 40 linear heads. Every head is one linear layer on the features.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.gradient_balancing.base import Combination, GradientBalancer

PATHS = ("loop", "batched", "features", "gramian", "representation", "auto")
EXACT = ("raw loop", "raw batched", "loop", "batched", "features", "gramian", "auto")


class FixedWeights(GradientBalancer):
    """w = 1 through the engine (the Balancer would short-cut ``Sum`` to one backward)."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        return Combination(weights=torch.ones(self.n_tasks, dtype=matrix.dtype, device=matrix.device))


class Model(nn.Module):
    def __init__(self, trunk: nn.Module, d_features: int, n_tasks: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(d_features, 1) for _ in range(n_tasks))

    def losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        z = self.trunk(x)
        return z, torch.stack([(head(z).squeeze(-1) - y[:, k]).pow(2).mean() for k, head in enumerate(self.heads)])


def mlp(d_in: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def cases(device: torch.device) -> list[tuple[str, Model, Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, trunk, d, k, x_shape in [
        ("MLP, K=2", mlp(64, 512), 512, 2, (256, 64)),
        ("CNN+BN, K=3", cnn(), 64, 3, (32, 3, 32, 32)),
        ("MLP, 40 heads", mlp(64, 256), 256, 40, (128, 64)),
    ]:
        torch.manual_seed(0)
        model = Model(trunk, d, k).to(device).train()
        x = torch.randn(x_shape, generator=gen).to(device)
        y = torch.randn(x_shape[0], k, generator=gen).to(device)
        out.append((name, model, x, y))
    return out


def step_fn(model: Model, x: Tensor, y: Tensor, path: str | None) -> Callable[[], None]:
    k = len(model.heads)
    balancer = tb.Balancer(n_tasks=k) if path is None else tb.Balancer(gradient=FixedWeights(), n_tasks=k, engine=path)  # type: ignore[arg-type]
    shared = list(model.trunk.parameters())

    def step() -> None:
        z, losses = model.losses(x, y)
        balancer.backward(losses, shared, features=z)
        model.zero_grad(set_to_none=True)

    return step


def raw_fn(model: Model, x: Tensor, y: Tensor, batched: bool) -> Callable[[], None]:
    inputs = list(model.parameters())
    eye = torch.eye(len(model.heads), device=x.device)

    def step() -> None:
        _, losses = model.losses(x, y)
        if batched:
            torch.autograd.grad(losses, inputs, eye, is_grads_batched=True, allow_unused=True)
        else:
            for k in range(len(model.heads)):
                torch.autograd.grad(losses[k], inputs, retain_graph=k < len(model.heads) - 1, allow_unused=True)

    return step


def measure(
    steps: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None], clock: Callable[[], float]
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(3):
        for step in steps.values():
            step()
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = clock()
            step()
            sync()
            times[name].append(clock() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # on a CPU shared with other jobs, the process's CPU time is steadier than wall time
    clock = time.perf_counter if cuda else time.process_time
    kind = "wall" if cuda else "process CPU"
    print(
        f"torch {torch.__version__}, {device}, {args.threads} thread(s), median {kind} time of {args.repeats} steps\n"
    )
    print(f"| {'model':<14} | {'path':<14} | {'ms/step':>8} | {'vs EW':>6} | {'vs floor':>8} |")
    print(f"|{'-' * 16}|{'-' * 16}|{'-' * 10}|{'-' * 8}|{'-' * 10}|")
    for name, model, x, y in cases(device):
        steps = {"ew": step_fn(model, x, y, None)}
        steps |= {"raw loop": raw_fn(model, x, y, False), "raw batched": raw_fn(model, x, y, True)}
        steps |= {p: step_fn(model, x, y, p) for p in PATHS}
        ms = measure(steps, args.repeats, sync, clock)
        floor = min(ms[p] for p in EXACT)
        for path, value in ms.items():
            print(f"| {name:<14} | {path:<14} | {value:8.2f} | {value / ms['ew']:6.2f} | {value / floor:8.2f} |")


if __name__ == "__main__":
    main()
