"""Save, then compare, the solutions of the gradient methods' solvers: a guard for solver speed work.

    python bench/solver_reference.py save [--path /tmp/solver_reference.pt]
    python bench/solver_reference.py compare [--path /tmp/solver_reference.pt]

A speed change to a solver must not change its answers. ``save`` runs every method below over the drifting input
sequences of ``bench/solvers.py`` (K = 2, 3, 5, 10; the aligned and the conflict case; the Gramian in float32, as
the engine hands it over, and in float64, J Jᵀ formed in float64), each sequence with a fresh method so that warm
starts act as in training, and stores every call's weights and converged flag. ``compare`` reruns them with the
current code and reports, per method and dtype, the largest absolute and relative difference of the weights and
the number of differing converged flags; it fails (exit 1) above 1e-9 absolute in float64, 1e-6 relative in
float32, or on any differing flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from solvers import make_method, sequence  # the bench's inputs and method options

METHODS = ("mgda", "imtl_g", "fairgrad", "gradvac", "cagrad", "upgrad", "imgrad")
KS = (2, 3, 5, 10)
CASES = ("aligned", "conflict")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
STEPS = 30

Key = tuple[str, str, int, str, int]  # method, case, K, dtype, step


def solutions() -> dict[Key, tuple[torch.Tensor, bool]]:
    """(weights, converged) of every method on every step of every input sequence."""
    out: dict[Key, tuple[torch.Tensor, bool]] = {}
    for k in KS:
        for case in CASES:
            steps = sequence(k, case, STEPS, torch.device("cpu"), keep_jacobian=True)
            for dtype_name, dtype in DTYPES.items():
                inputs = []
                for step in steps:
                    assert step.jacobian is not None
                    jacobian = step.jacobian.to(dtype)
                    inputs.append((jacobian @ jacobian.T, step.losses.to(dtype)))
                for name in METHODS:
                    method = make_method(name, k)
                    for t, (gramian, losses) in enumerate(inputs):
                        combination = method(gramian, losses)
                        assert combination.weights is not None
                        out[(name, case, k, dtype_name, t)] = (combination.weights.clone(), combination.converged)
    return out


def compare(saved: dict[Key, tuple[torch.Tensor, bool]], now: dict[Key, tuple[torch.Tensor, bool]]) -> bool:
    """Print the differences per method and dtype; whether all are within tolerance."""
    ok = True
    print("| method | dtype | max abs diff | max rel diff | flags differ | flags False (saved -> now) |")
    print("|---|---|---:|---:|---:|---|")
    for name in METHODS:
        for dtype_name in DTYPES:
            keys = [key for key in saved if key[0] == name and key[3] == dtype_name]
            abs_diff = rel_diff = 0.0
            flags = unconverged_saved = unconverged_now = 0
            for key in keys:
                (w0, c0), (w1, c1) = saved[key], now[key]
                diff = (w0.double() - w1.double()).abs()
                abs_diff = max(abs_diff, float(diff.max()))
                rel_diff = max(rel_diff, float((diff / w0.double().abs().max().clamp_min(1e-300)).max()))
                flags += c0 != c1
                unconverged_saved += not c0
                unconverged_now += not c1
            within = abs_diff <= 1e-9 if dtype_name == "float64" else rel_diff <= 1e-6
            ok = ok and within and flags == 0
            print(
                f"| {name} | {dtype_name} | {abs_diff:.2e} | {rel_diff:.2e} | {flags} | "
                f"{unconverged_saved} -> {unconverged_now} |"
            )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "compare"))
    parser.add_argument("--path", default="/tmp/solver_reference.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    now = solutions()
    if args.action == "save":
        torch.save(now, args.path)
        print(f"saved {len(now)} solutions to {args.path}")
        return
    saved = torch.load(args.path)
    if not compare(saved, now):
        sys.exit(1)


if __name__ == "__main__":
    main()
