"""The ``taskbalance`` command (also ``python -m taskbalance``).

Subcommands: ``methods`` lists every registered method with its level and paper line; ``run`` trains and compares
methods on a benchmark (:mod:`taskbalance.benchmarks.runner`); ``report`` turns a run folder into a markdown
table and plots (:mod:`taskbalance.benchmarks.report`); ``bench speed`` times every method's training step
(:mod:`taskbalance.speed`), ``bench solvers`` each solve from G at several task counts; ``--version`` prints the
installed version.

Only ``run``, ``report`` and ``bench`` import the benchmarks (numpy, tqdm; matplotlib for plots), and only when
they run: ``methods``, ``--version`` and every help text need torch alone.

A user's mistake ends in one line on stderr, ``taskbalance <command>: error: <message>``, and exit status 2, never
a traceback. :func:`main` applies that rule in one place, to argparse's errors (without the usage text, which
``--help`` shows) and to the exceptions the library raises for what a user gave it: ``ValueError`` (values, specs,
options, devices), ``OSError`` (files and folders), ``ImportError`` (a missing extra, with its install command) and
the benchmarks' ``DataSourceError`` and ``CheckpointError``. Any other exception is a bug and keeps its traceback.
Arguments are checked before any work (``bench speed --out`` is created and opened before the benchmark runs).
Ctrl-C ends in one line and status 130. A reader that closes stdout early (``taskbalance methods | head``) ends the
command quietly with status 141, the status of a program stopped by SIGPIPE, as ``seq 100000 | head`` has.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__, registry

_RUN_EPILOG = """\
examples:
  taskbalance run multimnist                                  # the README's default comparison (reduced protocol)
  taskbalance run multimnist --methods ew,igbv1+nashmtl --seeds 3 --epochs 20
  taskbalance run multifashion_mnist --protocol paper --seeds 0,1,2 --device cuda --out runs/fm-paper
  taskbalance run multimnist --out runs/multimnist --resume     # continue an interrupted run
  taskbalance run multimnist --nproc 2 --threads 2              # each method run on 2 processes

Each run of a seed starts from the same initialisation and sees the same batches. Single-task baselines are
trained first (cached in $TASKBALANCE_CACHE/stl, default ~/.cache/taskbalance/stl, and reused; delete it to
retrain them). The test metrics are taken at the epoch with the lowest validation Δm% against the single-task
baselines.
"""


def version() -> str:
    """The installed distribution's version; the package's own ``__version__`` when it runs uninstalled."""
    try:
        return importlib.metadata.version("taskbalance")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _methods(_: argparse.Namespace) -> int:
    rows: list[tuple[str, str, str]] = []
    for name in registry.LOSS_METHODS:
        rows.append(("loss", name, _summary(registry.loss_class(name))))
    for name, preset in registry.LOSS_PRESETS.items():
        rows.append(("loss", name, f"{preset.base} with {preset.options}"))
    for name in registry.GRADIENT_METHODS:
        rows.append(("gradient", name, _summary(registry.gradient_class(name))))
    for name, preset in registry.GRADIENT_PRESETS.items():
        rows.append(("preset", name, f"{preset.loss}+{preset.base}"))
    width = max(len(name) for _, name, _ in rows)
    for level, name, summary in rows:
        print(f"{level:<9} {name:<{width}}  {summary}")
    print("\nCombine a loss method and a gradient method with '+', e.g. igbv1+nashmtl.")
    return 0


def _seeds(text: str) -> int | list[int]:
    """``N`` → N seeds (0..N−1); ``a,b,...`` → those seeds (``7,`` is the single seed 7)."""
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a count (3) or a list of seeds (0,1,2), got {text!r}") from error


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _threads(text: str) -> int:
    """A thread count from 1 to the CPU count: more only oversubscribes the cores, and far more (20,000) makes
    torch's thread pool fail or crash the process."""
    value = _positive(text)
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise argparse.ArgumentTypeError(f"expected at most {cpus} (this machine's CPU count), got {value}")
    return value


def _thread_counts(text: str) -> list[int]:
    """Comma-separated thread counts, each as :func:`_threads` reads it."""
    return [_threads(part.strip()) for part in text.split(",")]


def _run(args: argparse.Namespace) -> int:
    from .benchmarks.runner.compare import run

    out = Path(args.out) if args.out is not None else Path("runs") / args.benchmark
    try:
        result = run(
            args.benchmark,
            registry.split_specs(args.methods),
            seeds=args.seeds,
            out_dir=out,
            epochs=args.epochs,
            protocol=args.protocol,
            device=args.device,
            resume=args.resume,
            data_dir=args.data_dir,
            threads=args.threads,
            progress=not args.no_progress,
            command=args.command_line,
            nproc=args.nproc,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with the same command and --out {out} --resume", file=sys.stderr)
        return 130
    print(result.table)
    print(
        f"\nrun folder: {result.out_dir} (results.json, results.csv; `taskbalance report {result.out_dir}` for plots)"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    run_dir = Path(args.dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: pass a folder written by `taskbalance run`")
    from .benchmarks.report.markdown import write_report

    path = write_report(run_dir, None if args.out is None else Path(args.out))
    print(path.read_text())
    written = sorted(p for p in path.parent.iterdir() if p.is_file())
    print("written:\n" + "\n".join(f"  {p}" for p in written))
    return 0


def _bench_speed(args: argparse.Namespace) -> int:
    from . import speed

    out = None if args.out is None else Path(args.out)
    methods = None if args.methods is None else registry.split_specs(args.methods)
    cases = args.cases.split(",")
    print(speed.run(cases, args.device, args.repeats, not args.no_torchjd, methods, out=out, threads=args.threads))
    if out is not None:
        print(f"written: {out}")
    return 0


def _bench_solvers(args: argparse.Namespace) -> int:
    from .speed import solvers

    methods = None if args.methods is None else args.methods.split(",")
    print(solvers.run(args.tasks, methods, args.repeats, threads=args.threads))
    return 0


def _task_counts(text: str) -> list[int]:
    return [_positive(part.strip()) for part in text.split(",")]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage it would print first is what ``--help`` shows)."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{self.prog}: error: {message} (see {self.prog} --help)")
        self.exit(2)


def _fail(line: str) -> None:
    """``line`` on stderr as one line, whatever newlines its message holds."""
    print(" ".join(part.strip() for part in line.splitlines() if part.strip()), file=sys.stderr)


#: the benchmarks' user-facing errors that are not a ValueError or an OSError ("module:class"); an error of one can
#: only exist once its module is loaded, so they are looked up in sys.modules and never imported here
_BENCHMARK_ERRORS = (
    "taskbalance.benchmarks.datasets.mnist:DataSourceError",
    "taskbalance.benchmarks.runner.checkpoint:CheckpointError",
)


def _user_errors() -> tuple[type[Exception], ...]:
    """The exception types that report a user's mistake (see the module docstring), bugs being everything else."""
    loaded: list[type[Exception]] = []
    for ref in _BENCHMARK_ERRORS:
        module, _, name = ref.partition(":")
        if module in sys.modules:
            loaded.append(getattr(sys.modules[module], name))
    return (ValueError, OSError, ImportError, *loaded)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskbalance",
        description="Task balancing for multi-task learning (loss level × gradient level): list the methods, "
        "compare them on benchmarks, and report the comparison.",
    )
    parser.add_argument("--version", action="version", version=f"taskbalance {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    methods = commands.add_parser(
        "methods", help="list the registered balancing methods", description="List every registered method."
    )
    methods.set_defaults(handler=_methods)

    from .benchmarks.catalog import BENCHMARKS, DEFAULT_METHODS

    run = commands.add_parser(
        "run",
        help="train single-task baselines and methods on a benchmark; print the comparison table",
        description="Train the single-task baselines (cached) and every method × seed on a benchmark, then\n"
        "write the run folder (config, per-epoch metrics, task weights, checkpoints, results.json/csv)\n"
        "and print a markdown table: mean ± std over seeds per metric, Δm% against the single-task\n"
        "baselines, mean rank.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("benchmark", metavar="BENCHMARK", help=f"one of: {', '.join(BENCHMARKS)}")
    run.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated method specs, '+' composes a loss and a gradient method "
        f"(default: {','.join(DEFAULT_METHODS)}; `taskbalance methods` lists the names)",
    )
    run.add_argument(
        "--seeds", type=_seeds, default=1, help="a count N (seeds 0..N-1) or a comma-separated list (default 1)"
    )
    run.add_argument("--epochs", type=_positive, help="override the protocol's epoch count (fewer = reduced)")
    run.add_argument(
        "--protocol", help="the benchmark's protocol (default: its reduced one; the MNIST family has quick and paper)"
    )
    run.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, mps")
    run.add_argument("--out", help="run folder (default runs/<benchmark>); must be new unless --resume")
    run.add_argument("--data-dir", help="user-provided data (IDX files for the MNIST family; required for nyuv2, ...)")
    run.add_argument(
        "--resume", action="store_true", help="continue the run folder: skip finished runs, resume the others"
    )
    run.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="CPU threads for torch (default 1: CPU results then do not depend on the core count, and a small "
        "model gains little from more threads; raise it for large models on the CPU)",
    )
    run.add_argument(
        "--nproc",
        type=_positive,
        default=1,
        help="processes that train each method run together, each on its share of every batch (default 1; at "
        "most the CPU count, or the GPU count with --device cuda; must divide the batch size); each process gets "
        "--threads / N torch threads, at least one",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)

    report = commands.add_parser(
        "report",
        help="write a markdown table and PNG plots from a run folder",
        description="Read a run folder written by `taskbalance run` and write report.md (mean ± std per metric, "
        "Δm%, mean rank, best per column marked) and PNG plots (validation curves, task weights, Δm% per "
        "method, Δm% against time per epoch). Prints the report and the files written.",
    )
    report.add_argument("dir", metavar="DIR", help="the run folder")
    report.add_argument("--out", help="where to write the report (default DIR/report)")
    report.set_defaults(handler=_report)

    bench = commands.add_parser("bench", help="speed benchmarks", description="Speed benchmarks.")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    speed = benches.add_parser(
        "speed",
        help="median ms per step of every method vs EW, the cost floor and torchjd; targets",
        description="Time a training step of every registered method on four models (MultiLeNet K=2, CNN+BN "
        "K=3, QM9 MPNN K=11, MLP with 40 heads), round-robin, and print per model: ms/step, ratio to EW, ratio "
        "to the cost floor (the cheapest exact per-task gradients), ratio to torchjd's same aggregator, solver "
        "time, peak memory; then whether each speed target holds.",
    )
    speed.add_argument("--cases", default="multilenet,cnn,qm9,mlp40", help="comma-separated models (default: all)")
    speed.add_argument("--methods", help="comma-separated specs to time (default: every registered method)")
    speed.add_argument("--repeats", type=_positive, default=11, help="timed steps per entry (default 11)")
    speed.add_argument("--device", default="cpu", help="torch device (default cpu)")
    speed.add_argument(
        "--threads",
        type=_thread_counts,
        default=None,
        help="CPU threads for torch, or a comma-separated list of counts to run in turn, the later ones with a "
        "column of speed-up over the first (default: torch's default, as users run; 1 thread is timed in CPU "
        "time, more in wall time)",
    )
    speed.add_argument("--no-torchjd", action="store_true", help="skip the torchjd comparison")
    speed.add_argument("--out", help="also write the markdown here")
    speed.set_defaults(handler=_bench_speed)
    solvers = benches.add_parser(
        "solvers",
        help="median ms of each solve from G at several task counts; the solver target",
        description="Call every gradient method that reads G as the engine does, on a drifting sequence of "
        "synthetic Gramians (K correlated gradients), and print the median ms per solve at each K, with whether "
        "the solver target holds (≤ 1 ms at K ≤ 10, ≤ 10 ms above).",
    )
    solvers.add_argument("--tasks", type=_task_counts, default=[2, 3, 5, 10], help="task counts (default 2,3,5,10)")
    solvers.add_argument("--methods", help="comma-separated names (default: every method that reads G)")
    solvers.add_argument("--repeats", type=_positive, default=50, help="timed solves per cell (default 50)")
    solvers.add_argument(
        "--threads", type=_threads, default=None, help="CPU threads for torch (default: torch's default)"
    )
    solvers.set_defaults(handler=_bench_solvers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments) and return its exit status; a user's mistake is
    one line on stderr and status 2 (see the module docstring)."""
    try:
        try:
            return _dispatch(sys.argv[1:] if argv is None else list(argv))
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return 141


def _dispatch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = "taskbalance " + shlex.join(argv)
    prog = " ".join(["taskbalance", args.command, *([args.bench] if args.command == "bench" else [])])
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        _fail(f"{prog}: interrupted")
        return 130
    except Exception as error:
        if isinstance(error, BrokenPipeError) or not isinstance(error, _user_errors()):
            raise
        _fail(f"{prog}: error: {str(error) or type(error).__name__}")
        return 2
    return status


def _discard_stdout() -> None:
    """Point stdout at the null device, as the Python docs advise for SIGPIPE: the interpreter's last flush of the
    unwritten output then succeeds instead of printing "Exception ignored ... BrokenPipeError" at exit."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # no file descriptor (stdout replaced in-process): nothing is flushed at exit
        return
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


if __name__ == "__main__":
    sys.exit(main())
