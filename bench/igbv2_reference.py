"""Is a faster SAC update still the same method? Record a seeded IGBv2 run, then compare a later version with it.

A fixed sequence of K = 3 losses (300 steps, ``end_epoch`` every 50) drives IGBv2 through its whole schedule with
SAC updates at a full buffer (base epoch 0, updates from epoch 1 every 10 steps, policy from epoch 2, a 100-transition
buffer, the default 128×128 networks): about 200 SAC updates, the policy acting for 200 steps. The weights of every
step and the final ``state_dict`` are saved; ``compare`` reruns and prints the largest differences.

    python bench/igbv2_reference.py save /tmp/igbv2_ref.pt      # with the code to compare against
    python bench/igbv2_reference.py compare /tmp/igbv2_ref.pt   # with the changed code

Both float32 (the practical rounding) and float64 (where any difference that is not rounding would stand out)
are recorded. The run is a chaotic system over ~200 Adam steps: a rounding change grows along it, which is why
this is a script with printed numbers rather than a test with a tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import taskbalance as tb

STEPS, EPOCH, K = 300, 50, 3
OPTIONS: dict[str, Any] = {
    "seed": 7,
    "base_epoch": 0,
    "train_epoch": 1,
    "policy_epoch": 2,
    "update_every": 10,
    "batch_size": 64,
    "buffer_size": 100,
}


def loss_sequence() -> Tensor:
    """(STEPS, K) positive losses: decaying trends with seeded noise, one task slower than the others."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(STEPS, dtype=torch.float64).unsqueeze(1)
    rates = torch.tensor([0.004, 0.01, 0.002], dtype=torch.float64)
    noise = 1 + 0.1 * torch.randn(STEPS, K, generator=g, dtype=torch.float64)
    return torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64) * torch.exp(-rates * t) * noise.abs()


def record(dtype: torch.dtype) -> dict[str, Any]:
    """The weights of every step and the final state_dict of one run in ``dtype``."""
    torch.set_num_threads(1)
    balancer = tb.Balancer(loss=tb.IGBv2(**OPTIONS), n_tasks=K).to(dtype)
    igb: Any = balancer.loss
    weights = []
    for t, losses in enumerate(loss_sequence().to(dtype)):
        weights.append(igb.balance(losses).weights.clone())
        if (t + 1) % EPOCH == 0:
            igb.end_epoch()
    return {"weights": torch.stack(weights), "state": tensors(balancer.state_dict()), "updates": igb.agent.n_updates}


def tensors(tree: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every floating tensor of a nested state (dicts, lists, tuples), by a path name."""
    out: dict[str, Tensor] = {}
    if isinstance(tree, Tensor):
        if tree.is_floating_point():
            out[prefix] = tree.detach().clone()
    elif isinstance(tree, dict):
        for key, value in tree.items():
            out.update(tensors(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            out.update(tensors(value, f"{prefix}/{i}"))
    return out


def relative(a: Tensor, b: Tensor) -> float:
    """max |a − b| / max |b| (the difference measured on the tensor's own scale)."""
    scale = b.abs().max().item()
    return float((a - b).abs().max().item() / scale) if scale > 0 else float((a - b).abs().max().item())


def compare(saved: dict[str, Any], now: dict[str, Any]) -> tuple[float, float, str]:
    """(largest relative weight difference, largest relative state difference, the state tensor that has it)."""
    if saved["updates"] != now["updates"]:
        raise SystemExit(f"different update counts: {saved['updates']} vs {now['updates']}")
    w_ref, w_now = saved["weights"], now["weights"]
    w_rel = float(((w_now - w_ref).abs() / w_ref.abs()).max().item())
    missing = set(saved["state"]) ^ set(now["state"])
    if missing:
        raise SystemExit(f"state keys differ: {sorted(missing)[:10]}")
    worst, where = 0.0, ""
    for key, ref in saved["state"].items():
        rel = relative(now["state"][key], ref)
        if rel > worst:
            worst, where = rel, key
    return w_rel, worst, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("save", "compare"))
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    runs = {str(dtype): record(dtype) for dtype in (torch.float32, torch.float64)}
    if args.mode == "save":
        torch.save(runs, args.path)
        print(f"saved {args.path}: {runs['torch.float32']['updates']} SAC updates per run")
        return 0
    saved = torch.load(args.path, weights_only=True)
    print("| dtype | SAC updates | max rel. diff weights (300 steps) | max rel. diff state | worst state tensor |")
    print("|---|---|---|---|---|")
    for dtype, now in runs.items():
        w_rel, s_rel, where = compare(saved[dtype], now)
        print(f"| {dtype} | {now['updates']} | {w_rel:.2e} | {s_rel:.2e} | {where} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
