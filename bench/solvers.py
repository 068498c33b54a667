"""Solver time per step of every gradient method: median and p90 ms of one ``method(matrix, losses)`` call.

    python bench/solvers.py [--repeats 3] [--device cpu] [--ks 2,3,10,11,40] [--steps 60] [--methods mgda,nashmtl]

What is timed: only the method call, with its input ready (G = J Jᵀ for ``needs == "gramian"``, J itself for
``needs == "jacobian"``; both float32, as the engine hands them over). On CPU the clock is the process's CPU time
with one thread (steady on a shared machine); on CUDA it is wall time between two ``torch.cuda.synchronize()``.

Inputs: a sequence of ``--steps`` Jacobians of P = 20 000 columns, rows g_k = s_k (√ρ·σ_k·u + √(1−ρ)·e_k) with a
shared direction u, private directions e_k, norms s_k spread over two decades, and losses decaying at per-task
rates. Every step u, e_k and s_k drift a little (5% noise in direction, 2% in log norm), so a warm start from the
previous step's solution is close but not exact, as in training. Two cases: "aligned" (ρ = 0.5, σ_k = +1:
correlated gradients) and "conflict" (ρ = 0.6, σ_k = ±1 alternating: pairs at cosine ≈ −0.6, 0 nearly in the
hull). Each repeat runs a fresh method instance over the whole sequence (after one untimed warm-up pass), so
warm starts act as in training; the statistics pool every call.

Target (issue 5): ≤ 1 ms per call for K ≤ 10, ≤ 10 ms for 10 < K ≤ 40. "syncs/call" counts the device-to-host
reads per call: on CPU by counting the Tensor methods that read a value (bool, float, int, item, tolist, nonzero,
cpu, numpy), on CUDA with ``torch.cuda.set_sync_debug_mode``. "unconverged" counts calls whose Combination
says ``converged=False`` (expected in the conflict case for methods with no solution there, e.g. Nash-MTL).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from taskbalance.gradient_balancing.base import GradientBalancer
from taskbalance.registry import GRADIENT_METHODS, gradient_class

P = 20_000
CASES = {"aligned": (0.5, False), "conflict": (0.6, True)}


@dataclass(frozen=True)
class Step:
    jacobian: Tensor | None
    gramian: Tensor
    losses: Tensor


def sequence(k: int, case: str, steps: int, device: torch.device, keep_jacobian: bool, seed: int = 0) -> list[Step]:
    """The drifting inputs of one (K, case): see the module docstring."""
    rho, alternate = CASES[case]
    gen = torch.Generator().manual_seed(seed * 1000 + k)
    shared = torch.randn(P, generator=gen)
    private = torch.randn(k, P, generator=gen)
    signs = torch.tensor([(-1.0) ** i if alternate else 1.0 for i in range(k)])
    log_scales = torch.linspace(-1.0, 1.0, k)[torch.randperm(k, generator=gen)] * math.log(10)
    rates = 0.002 + 0.01 * torch.rand(k, generator=gen)
    start_losses = 0.5 + torch.rand(k, generator=gen)
    out = []
    for t in range(steps):
        rows = math.sqrt(rho) * signs[:, None] * shared + math.sqrt(1 - rho) * private
        jacobian = (log_scales.exp()[:, None] * rows / math.sqrt(P)).to(device=device, dtype=torch.float32)
        losses = (start_losses * torch.exp(-rates * t)).to(device=device, dtype=torch.float32)
        out.append(Step(jacobian if keep_jacobian else None, jacobian @ jacobian.T, losses))
        shared = shared + 0.05 * torch.randn(P, generator=gen)
        shared = shared / shared.norm() * math.sqrt(P)
        private = private + 0.05 * torch.randn(k, P, generator=gen)
        private = private / private.norm(dim=1, keepdim=True) * math.sqrt(P)
        log_scales = log_scales + 0.02 * torch.randn(k, generator=gen)
    return out


def make_method(name: str, k: int) -> GradientBalancer:
    cls = gradient_class(name)
    options: dict[str, Any] = {"seed": 0} if name in ("pcgrad", "gradvac", "graddrop") else {}
    method = cls(**options)
    method.setup(k)
    return method


def timer(device: torch.device) -> Callable[[Callable[[], Any]], tuple[float, Any]]:
    """A function running a call and returning (ms, its result): CPU process time or synchronised wall time."""
    if device.type == "cuda":

        def run_cuda(call: Callable[[], Any]) -> tuple[float, Any]:
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = call()
            torch.cuda.synchronize(device)
            return 1e3 * (time.perf_counter() - start), result

        return run_cuda

    def run_cpu(call: Callable[[], Any]) -> tuple[float, Any]:
        start = time.process_time_ns()
        result = call()
        return 1e-6 * (time.process_time_ns() - start), result

    return run_cpu


_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def count_reads(device: torch.device) -> Iterator[list[int]]:
    """Count device-to-host reads inside the block (a one-element list holding the count)."""
    counter = [0]
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        counter[0] = sum("synchroniz" in str(w.message) for w in caught)
        return
    originals = {name: getattr(Tensor, name) for name in _READS}

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            counter[0] += 1
            return original(self, *args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(Tensor, name, counted(original))
        yield counter
    finally:
        for name, original in originals.items():
            setattr(Tensor, name, original)


@dataclass(frozen=True)
class Row:
    method: str
    case: str
    k: int
    median: float
    p90: float
    target: float
    syncs: float
    unconverged: int


def target_ms(k: int) -> float:
    return 1.0 if k <= 10 else 10.0


def bench_one(name: str, k: int, case: str, steps: list[Step], repeats: int, device: torch.device) -> Row:
    jacobian_input = gradient_class(name).needs == "jacobian"

    def inputs(step: Step) -> tuple[Tensor, Tensor]:
        matrix = step.jacobian if jacobian_input else step.gramian
        assert matrix is not None
        return matrix, step.losses

    warm = make_method(name, k)
    for step in steps:  # untimed: kernels, caches, lazy imports
        warm(*inputs(step))
    clock = timer(device)
    times: list[float] = []
    unconverged = 0
    for _ in range(repeats):
        method = make_method(name, k)
        for step in steps:
            matrix, losses = inputs(step)
            elapsed, combination = clock(functools.partial(method, matrix, losses))
            times.append(elapsed)
            unconverged += not combination.converged
    method = make_method(name, k)
    reads = []
    for step in steps:
        with count_reads(device) as counter:
            method(*inputs(step))
        reads.append(counter[0])
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return Row(
        name, case, k, statistics.median(times), p90, target_ms(k), statistics.mean(reads), unconverged // repeats
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the sequence (fresh method each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default="2,3,10,11,40", help="comma-separated numbers of tasks")
    parser.add_argument("--steps", type=int, default=60, help="length of the drifting sequence")
    parser.add_argument("--methods", default="", help="comma-separated subset of the registered gradient methods")
    parser.add_argument("--cases", default="aligned,conflict")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    ks = [int(k) for k in args.ks.split(",")]
    names = [m for m in args.methods.split(",") if m] or list(GRADIENT_METHODS)
    cases = [c for c in args.cases.split(",") if c]
    needs_jacobian = any(gradient_class(n).needs == "jacobian" for n in names)
    rows: list[Row] = []
    for k in ks:
        for case in cases:
            steps = sequence(k, case, args.steps, device, needs_jacobian)
            for name in names:
                rows.append(bench_one(name, k, case, steps, args.repeats, device))
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu, 1 thread'}), "
        f"P = {P}, {args.steps} steps x {args.repeats} repeats\n"
    )
    print("| method | case | K | median ms | p90 ms | target ms | holds | syncs/call | unconverged |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for r in sorted(rows, key=lambda r: (names.index(r.method), cases.index(r.case), r.k)):
        holds = "yes" if r.median <= r.target else "no"
        print(
            f"| {r.method} | {r.case} | {r.k} | {r.median:.3f} | {r.p90:.3f} | {r.target:g} | {holds} | "
            f"{r.syncs:.1f} | {r.unconverged}/{args.steps} |"
        )


if __name__ == "__main__":
    main()
