"""The one run summariser: per method, the test metrics over seeds, Δm% against the single-task baselines and the
mean rank. The runner's ``results.json`` (:mod:`.results`) and ``taskbalance report`` (:mod:`.markdown`) both
read their numbers from here, so the two can never disagree.

- Each seed contributes the test metrics of its selected epoch, as recorded in its ``final.json``.
- STL reference: for each metric, the mean over seeds of its task's single-task baseline.
- Δm% of a method and seed: against that reference (:mod:`~..metrics.delta_m`); the method's Δm% is its mean over
  seeds, which equals the Δm% of its mean metrics because Δm% is linear in the metrics.
- Mean rank: per metric, methods ranked by their mean over seeds (1 = best, ties share; the STL row is not
  ranked), averaged over the metrics; only methods with every metric are ranked.
- Spread: the sample standard deviation over seeds (None with one seed).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..base import Metric
from ..metrics.delta_m import delta_m, mean_ranks


@dataclass(frozen=True)
class Stat:
    """Values over seeds with their mean and sample standard deviation (n − 1; None for a single value)."""

    mean: float
    std: float | None
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def as_dict(self) -> dict[str, Any]:
        """The ``{"mean", "std", "values"}`` entry of results.json."""
        return {"mean": self.mean, "std": self.std, "values": list(self.values)}


def stat(values: Sequence[float]) -> Stat | None:
    """The :class:`Stat` of ``values``; None for no values."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, tuple(values))


@dataclass(frozen=True)
class SeedResult:
    """What ``final.json`` records for one finished seed."""

    seed: int
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    time_per_epoch_s: float | None
    overhead_s_per_step: float | None

    @classmethod
    def from_final(cls, seed: int, final: Mapping[str, Any]) -> SeedResult:
        """Parse a ``final.json`` dict (the timings may be absent)."""
        return cls(
            seed=seed,
            best_epoch=int(final["best_epoch"]),
            val={k: float(v) for k, v in final.get("val", {}).items()},
            test={k: float(v) for k, v in final["test"].items()},
            time_per_epoch_s=_optional_float(final.get("time_per_epoch_s")),
            overhead_s_per_step=_optional_float(final.get("balancing_overhead_s_per_step")),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass
class MethodSummary:
    """One method over its finished seeds (sorted): metric stats, Δm% and mean rank when defined, mean timings."""

    name: str
    seeds: list[int]
    metrics: dict[str, Stat]
    delta_m: Stat | None = None
    mean_rank: float | None = None
    time_per_epoch_s: float | None = None
    overhead_s_per_step: float | None = None


def stl_stats(metrics: Sequence[Metric], stl: Mapping[str, Mapping[int, SeedResult]]) -> dict[str, Stat]:
    """Each metric's single-task test values over its task's finished seeds (``stl``: task → seed → result);
    metrics without any are left out."""
    stats: dict[str, Stat] = {}
    for metric in metrics:
        runs = stl.get(metric.task, {})
        s = stat([r.test[metric.name] for r in runs.values() if metric.name in r.test])
        if s is not None:
            stats[metric.name] = s
    return stats


def stl_reference(metrics: Sequence[Metric], stl: Mapping[str, Mapping[int, SeedResult]]) -> dict[str, float] | None:
    """The Δm% reference: each metric's mean single-task value; None when a metric has no baseline."""
    stats = stl_stats(metrics, stl)
    if len(stats) < len(metrics):
        return None
    return {metric.name: stats[metric.name].mean for metric in metrics}


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def summarize(
    metrics: Sequence[Metric],
    methods: Mapping[str, Mapping[int, SeedResult]],
    reference: Mapping[str, float] | None,
) -> dict[str, MethodSummary]:
    """Every method's summary, in the order of ``methods`` (method spec → seed → its result).

    Raises:
        ValueError: a reference value is 0 or not finite (Δm% is undefined; see :func:`~..metrics.delta_m.delta_m`).
    """
    directions = {m.name: m.higher_is_better for m in metrics}
    summaries: dict[str, MethodSummary] = {}
    for name, by_seed in methods.items():
        results = [by_seed[s] for s in sorted(by_seed)]
        stats = {m.name: stat([r.test[m.name] for r in results if m.name in r.test]) for m in metrics}
        summary = MethodSummary(
            name,
            [r.seed for r in results],
            {k: v for k, v in stats.items() if v is not None},
            time_per_epoch_s=_mean([r.time_per_epoch_s for r in results]),
            overhead_s_per_step=_mean([r.overhead_s_per_step for r in results]),
        )
        if reference is not None:
            complete = [r.test for r in results if all(k in r.test for k in reference)]
            summary.delta_m = stat([delta_m(test, reference, directions) for test in complete])
        summaries[name] = summary
    ranked = {name: s for name, s in summaries.items() if len(s.metrics) == len(metrics)}
    if ranked:
        table = {name: {k: v.mean for k, v in s.metrics.items()} for name, s in ranked.items()}
        for name, rank in mean_ranks(table, directions).items():
            summaries[name].mean_rank = rank
    return summaries
