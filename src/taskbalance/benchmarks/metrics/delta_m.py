"""Δm% (the relative change against single-task baselines) and the mean rank of methods over metrics.

    Δm% = (1/M) Σ_i (−1)^{δ_i} (M_i − M_i^STL) / M_i^STL × 100,   δ_i = 1 when higher is better

so a method that is uniformly better than the single-task (STL) models has a negative Δm%: lower is better.
Maninis, Radosavovic, Kokkinos, "Attentive Single-Tasking of Multiple Tasks" (CVPR 2019, arXiv 1904.08918)
introduced it; Liu et al.'s Nash-MTL / FAMO and Dai et al.'s IGB papers report it with this sign convention.

The mean rank (MR in those papers): per metric, rank the methods by their value (1 = best, ties share the mean
of the ranks they span), then average each method's ranks over the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def delta_m(
    values: Mapping[str, float],
    reference: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    *,
    skip_zero_reference: bool = False,
) -> float:
    """Δm% of ``values`` against ``reference`` over the metrics named in ``higher_is_better``.

    Args:
        values, reference: metric name → value; both must hold every metric of ``higher_is_better``.
        higher_is_better: metric name → direction; its keys are the M metrics averaged over.
        skip_zero_reference: leave out metrics whose reference is 0 (their relative change is undefined) instead
            of raising; NaN if that leaves none.

    Raises:
        ValueError: no metrics, a missing metric, a non-finite reference, or a zero reference (unless skipped).
    """
    if not higher_is_better:
        raise ValueError("delta_m needs at least one metric")
    missing = [name for name in higher_is_better if name not in values or name not in reference]
    if missing:
        raise ValueError(f"metrics missing from the values or the reference: {', '.join(missing)}")
    terms: list[float] = []
    for name, higher in higher_is_better.items():
        ref = float(reference[name])
        if not math.isfinite(ref):
            raise ValueError(f"the reference of {name!r} is not finite ({ref})")
        if ref == 0.0:
            if skip_zero_reference:
                continue
            raise ValueError(f"the reference of {name!r} is 0: its relative change is undefined")
        sign = -1.0 if higher else 1.0
        terms.append(sign * (float(values[name]) - ref) / abs(ref))
    if not terms:
        return math.nan
    return 100.0 * sum(terms) / len(terms)


def ranks(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """The rank of each value (1 = best); tied values share the mean of the ranks they span; NaN ranks last."""
    order_key = [(-v if higher_is_better else v) if not math.isnan(v) else math.inf for v in values]
    order = sorted(range(len(values)), key=lambda i: order_key[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and order_key[order[end + 1]] == order_key[order[start]]:
            end += 1
        shared = (start + end) / 2 + 1
        for position in range(start, end + 1):
            result[order[position]] = shared
        start = end + 1
    return result


def mean_ranks(table: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    """method → its rank averaged over the metrics of ``higher_is_better`` (``table``: method → metric → value)."""
    if not higher_is_better:
        raise ValueError("mean_ranks needs at least one metric")
    methods = list(table)
    totals = dict.fromkeys(methods, 0.0)
    for name, higher in higher_is_better.items():
        missing = [m for m in methods if name not in table[m]]
        if missing:
            raise ValueError(f"metric {name!r} missing for method(s) {', '.join(missing)}")
        for method, rank in zip(methods, ranks([float(table[m][name]) for m in methods], higher), strict=True):
            totals[method] += rank
    return {method: total / len(higher_is_better) for method, total in totals.items()}
