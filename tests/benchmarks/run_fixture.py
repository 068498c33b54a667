"""A small but realistic run folder in the runner's exact format, for report tests (and by hand: ``python -m
tests.benchmarks.run_fixture DIR`` writes one).

Epochs and steps are numbered from 1, as the runner numbers them.
Two tasks (left, right), four metrics with mixed directions (accuracy ↑, cross-entropy ↓ per task), three methods
(ew, igbv1, igbv1+nashmtl) × three seeds, single-task baselines, five epochs. The test values at each seed's best
validation epoch are the round numbers of :data:`FINAL_TEST`, so tests can check the table by hand. The training
losses are simulated per step, and IGBv1's weights are computed from them exactly as the method does (K·softmax of
the batch losses over the second-epoch mean), so the weights plot shows real gap tracking.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASKS = ("left", "right")
METRICS: list[dict[str, Any]] = [
    {"name": "left/acc", "task": "left", "higher_is_better": True},
    {"name": "right/acc", "task": "right", "higher_is_better": True},
    {"name": "left/ce", "task": "left", "higher_is_better": False},
    {"name": "right/ce", "task": "right", "higher_is_better": False},
]
METHODS = ("ew", "igbv1", "igbv1+nashmtl")
SEEDS = (0, 1, 2)


def _seeds(acc_l: Sequence[float], acc_r: Sequence[float], ce_l: Sequence[float], ce_r: Sequence[float]) -> Any:
    return {s: {"left/acc": acc_l[s], "right/acc": acc_r[s], "left/ce": ce_l[s], "right/ce": ce_r[s]} for s in range(3)}


#: test metrics at the best validation epoch, per method (and STL task) and seed
FINAL_TEST: dict[str, dict[int, dict[str, float]]] = {
    "ew": _seeds([94, 95, 96], [90, 92, 94], [0.22, 0.24, 0.26], [0.30, 0.30, 0.30]),
    "igbv1": _seeds([95, 96, 97], [92, 93, 94], [0.20, 0.21, 0.22], [0.26, 0.28, 0.30]),
    "igbv1+nashmtl": _seeds([96, 96.5, 97], [91, 92, 93], [0.18, 0.20, 0.22], [0.26, 0.28, 0.30]),
    # the STL runs of a task report that task's metrics only
    "stl/left": {s: {"left/acc": [95, 96, 97][s], "left/ce": [0.19, 0.20, 0.21][s]} for s in range(3)},
    "stl/right": {s: {"right/acc": [93, 94, 95][s], "right/ce": [0.24, 0.25, 0.26][s]} for s in range(3)},
}
#: training seconds per epoch (plus a little per-seed jitter)
EPOCH_SECONDS = {"ew": 10.0, "igbv1": 10.5, "igbv1+nashmtl": 25.0, "stl/left": 6.0, "stl/right": 6.0}
STEPS_PER_EPOCH = 40
WEIGHT_STRIDE = 2


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


def _losses(rng: np.random.Generator, tasks: Sequence[str], epochs: int, right_boost: float) -> np.ndarray:
    """Per-step raw training losses (steps, K): the left task learns fast, the right one slowly."""
    t = np.arange(epochs * STEPS_PER_EPOCH) / STEPS_PER_EPOCH
    rate = {"left": 1.2, "right": 0.35 * right_boost}
    base = np.stack([2.3 * np.exp(-rate[task] * t) + 0.1 for task in tasks], axis=1)
    return base * np.exp(0.08 * rng.standard_normal(base.shape))


def _weights(method: str, losses: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Effective weights per step, as the method computes them from the batch losses."""
    k = losses.shape[1]
    weights = np.ones_like(losses)
    if method.startswith("igbv1"):
        baseline = losses[STEPS_PER_EPOCH : 2 * STEPS_PER_EPOCH].mean(axis=0)  # the second epoch's mean
        z = losses[2 * STEPS_PER_EPOCH :] / baseline
        e = np.exp(z - z.max(axis=1, keepdims=True))
        weights[2 * STEPS_PER_EPOCH :] = k * e / e.sum(axis=1, keepdims=True)
    if method.endswith("nashmtl"):
        # Nash-MTL's α scales roughly with 1/‖g_k‖; the fast task's gradient shrinks first
        alpha = 1.0 / np.sqrt(losses + 0.2) * np.exp(0.05 * rng.standard_normal(losses.shape))
        weights = weights * alpha / alpha.mean(axis=1, keepdims=True)
    return weights


def _write_seed(
    seed_dir: Path,
    key: str,
    spec: str,
    seed: int,
    tasks: Sequence[str],
    epochs: int,
    finished: bool,
    rng: np.random.Generator,
) -> None:
    final = FINAL_TEST[key][seed % 3]
    best_epoch = epochs - seed % 2  # epochs are numbered from 1, as the runner does
    done = epochs if finished else max(1, epochs - 2)
    losses = _losses(rng, tasks, epochs, right_boost=1.4 if spec.startswith("igb") else 1.0)
    weights = _weights(spec, losses, rng)
    seed_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for epoch in range(1, done + 1):
        gap = (epoch - best_epoch) ** 2
        val = {m: v + (0.3 - 0.6 * gap if "acc" in m else -0.01 + 0.02 * gap) for m, v in final.items()}
        test = {m: v - (0.5 * gap if "acc" in m else -0.015 * gap) for m, v in final.items()}
        block = losses[(epoch - 1) * STEPS_PER_EPOCH : epoch * STEPS_PER_EPOCH]
        records.append(
            {
                "epoch": epoch,
                "time_s": EPOCH_SECONDS[key] * (1 + 0.02 * seed),
                "lr": 1e-3,
                "train": {f"loss/{task}": float(block[:, k].mean()) for k, task in enumerate(tasks)},
                "val": val,
                "test": test,
            }
        )
    (seed_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with (seed_dir / "weights.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", *tasks])
        for index in range(0, done * STEPS_PER_EPOCH, WEIGHT_STRIDE):  # steps numbered from 1, as the runner does
            row = weights[index]
            writer.writerow([index + 1, index // STEPS_PER_EPOCH + 1, *(f"{w:.6g}" for w in row)])
    torch.save({"epoch": done, "seed": seed}, seed_dir / "checkpoint.pt")
    if finished:
        _write_json(
            seed_dir / "final.json",
            {
                "method": spec,
                "seed": seed,
                "best_epoch": best_epoch,
                "val": records[best_epoch - 1]["val"],
                "test": records[best_epoch - 1]["test"],
                "time_per_epoch_s": float(np.mean([r["time_s"] for r in records])),
                "balancing_overhead_s_per_step": 0.0 if spec == "ew" else 0.001 * len(spec),
            },
        )


def make_run_folder(
    out: Path,
    *,
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] = SEEDS,
    stl: bool = True,
    unfinished: Mapping[str, Collection[int]] | None = None,
    epochs: int = 5,
    reduced: bool = True,
) -> Path:
    """Write a run folder under ``out``; ``unfinished`` maps a method to seeds that stop before the end (no
    ``final.json``). Seeds index :data:`FINAL_TEST` modulo 3."""
    unfinished = {} if unfinished is None else unfinished
    out = Path(out)
    _write_json(
        out / "config.json",
        {
            "benchmark": "multimnist",
            "protocol": "quick" if reduced else "paper",
            "protocol_description": "10k training images, 5 epochs, Adam 1e-3" if reduced else "full data",
            "reduced": reduced,
            "methods": list(methods),
            "seeds": list(seeds),
            "epochs": epochs,
            "batch_size": 256,
            "lr": 1e-3,
            "device": "cpu",
            "command": "taskbalance run multimnist --methods " + ",".join(methods) + f" --seeds {len(seeds)}",
            "versions": {"taskbalance": "0.1.0", "torch": torch.__version__},
            "tasks": list(TASKS),
            "metrics": METRICS,
        },
    )
    for i, spec in enumerate(methods):
        for seed in seeds:
            rng = np.random.default_rng([seed, i])
            finished = seed not in unfinished.get(spec, ())
            seed_dir = out / "runs" / spec.replace("+", "__") / f"seed{seed}"
            _write_seed(seed_dir, spec, spec, seed, TASKS, epochs, finished, rng)
    if stl:
        for k, task in enumerate(TASKS):
            for seed in seeds:
                rng = np.random.default_rng([seed, 100 + k])
                _write_seed(out / "stl" / task / f"seed{seed}", f"stl/{task}", "stl", seed, (task,), epochs, True, rng)
    rows = [
        {"method": spec, "seed": seed, "metric": name, "value": value}
        for spec in methods
        for seed in seeds
        if seed not in unfinished.get(spec, ())
        for name, value in FINAL_TEST[spec][seed % 3].items()
    ]
    _write_json(out / "results.json", rows)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "seed", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    return out


if __name__ == "__main__":
    print(make_run_folder(Path(sys.argv[1])))
