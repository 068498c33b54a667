"""How long does one SAC update take, as IGBv2 runs it at a full buffer? Median ms at one thread.

The agent is IGBv2's: K = 3 losses as the state, K weights as the action (softmax squash), 128×128 networks, a full
10,000-transition buffer, minibatches of 256 (IGBv2's size at a full buffer). With ``--against SRC`` a second copy of
taskbalance is imported from another source tree (e.g. the ``src`` of a checkout before a change) and the two
agents are timed alternately in this process, so that a slow spell of a shared machine hits both alike.

    PYTHONPATH=src python bench/sac_update.py [--against ../before/src] [--updates 300] [--k 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import taskbalance.rl


def load_copy(src: Path) -> ModuleType:
    """taskbalance from another source tree, imported under the name ``taskbalance_against``."""
    init = src / "taskbalance" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "taskbalance_against", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no taskbalance package under {src}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["taskbalance_against"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("taskbalance_against.rl")


def agent(rl: Any, k: int, capacity: int) -> Any:
    """IGBv2's agent with a buffer filled by seeded random transitions."""
    sac = rl.SAC(k, k, rl.SoftmaxSquash(float(k)), buffer_size=capacity, seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(capacity):
        s, s2 = torch.rand(k, generator=g) + 0.5, torch.rand(k, generator=g) + 0.5
        a = k * torch.softmax(torch.randn(k, generator=g), 0)
        sac.store(s, a, float(torch.randn((), generator=g)) * 0.1, s2)
    return sac


def time_update(sac: Any, batch: int) -> float:
    start = time.process_time()
    sac.update(batch)
    return 1e3 * (time.process_time() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", type=Path, help="another source tree to time alternately")
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--capacity", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    versions = {"this tree": taskbalance.rl}
    if args.against is not None:
        versions["against"] = load_copy(args.against)
    agents = {name: agent(rl, args.k, args.capacity) for name, rl in versions.items()}
    for sac in agents.values():  # warm-up: first-call allocations and lazy initialisation
        for _ in range(10):
            sac.update(args.batch)
    times: dict[str, list[float]] = {name: [] for name in agents}
    for _ in range(args.updates):
        for name, sac in agents.items():
            times[name].append(time_update(sac, args.batch))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), K = {args.k}, batch {args.batch}")
    print("| version | median ms / update | p25 | p75 |")
    print("|---|---|---|---|")
    for name, ms in times.items():
        q = statistics.quantiles(ms, n=4)
        print(f"| {name} | {statistics.median(ms):.2f} | {q[0]:.2f} | {q[2]:.2f} |")
    if len(times) == 2:
        ratio = statistics.median(times["this tree"]) / statistics.median(times["against"])
        print(f"\nthis tree / against: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
