"""Δm% and mean rank against hand-computed values, and their invariances."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.benchmarks.metrics.delta_m import delta_m, mean_ranks, ranks


def test_hand_computed_mixed_directions() -> None:
    # accuracy 90 vs STL 80 (higher better): −12.5 %; error 0.3 vs 0.2 (lower better): +50 %; mean 18.75
    values = {"acc": 90.0, "err": 0.3}
    reference = {"acc": 80.0, "err": 0.2}
    directions = {"acc": True, "err": False}
    assert delta_m(values, reference, directions) == pytest.approx(18.75)
    # acc 10 % worse (+10), err 50 % worse (+50): mean +30
    assert delta_m(values, {"acc": 100.0, "err": 0.2}, directions) == pytest.approx(30.0)
    # only the metrics named in the directions count
    assert delta_m({**values, "x": 1.0}, {**reference, "x": 2.0}, {"acc": True}) == pytest.approx(-12.5)


def test_equal_to_reference_is_zero_and_uniformly_better_is_negative() -> None:
    reference = {"a": 50.0, "b": 2.0, "c": 0.5}
    directions = {"a": True, "b": False, "c": False}
    assert delta_m(reference, reference, directions) == 0.0
    better = {"a": 55.0, "b": 1.8, "c": 0.45}  # 10 % better on each
    assert delta_m(better, reference, directions) == pytest.approx(-10.0)


def test_negative_reference_uses_its_magnitude() -> None:
    # a log-likelihood of −2 (higher better) improving to −1 is a 50 % improvement, so Δm = −50
    assert delta_m({"ll": -1.0}, {"ll": -2.0}, {"ll": True}) == pytest.approx(-50.0)


def test_zero_reference_and_bad_input() -> None:
    with pytest.raises(ValueError, match="reference of 'a' is 0"):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": True})
    assert delta_m({"a": 1.0, "b": 3.0}, {"a": 0.0, "b": 2.0}, {"a": True, "b": False}, skip_zero_reference=True) == (
        pytest.approx(50.0)
    )
    assert math.isnan(delta_m({"a": 1.0}, {"a": 0.0}, {"a": True}, skip_zero_reference=True))
    with pytest.raises(ValueError, match="at least one metric"):
        delta_m({}, {}, {})
    with pytest.raises(ValueError, match=r"missing.*b"):
        delta_m({"a": 1.0}, {"a": 1.0, "b": 1.0}, {"a": True, "b": True})
    with pytest.raises(ValueError, match="not finite"):
        delta_m({"a": 1.0}, {"a": math.nan}, {"a": True})


@given(
    st.lists(st.floats(0.1, 100.0), min_size=3, max_size=3),
    st.lists(st.floats(0.1, 100.0), min_size=3, max_size=3),
    st.floats(0.01, 100.0),
)
def test_invariant_to_metric_order_and_scale(values: list[float], reference: list[float], scale: float) -> None:
    names = ["x", "y", "z"]
    directions = {"x": True, "y": False, "z": True}
    v, r = dict(zip(names, values, strict=True)), dict(zip(names, reference, strict=True))
    base = delta_m(v, r, directions)
    reordered = {n: directions[n] for n in reversed(names)}
    assert delta_m(v, r, reordered) == pytest.approx(base)
    # a change of units (metric and reference scaled alike) leaves relative changes alone
    assert delta_m({n: x * scale for n, x in v.items()}, {n: x * scale for n, x in r.items()}, directions) == (
        pytest.approx(base, rel=1e-9, abs=1e-9)
    )


@given(
    st.lists(st.tuples(st.floats(0.1, 100), st.floats(0.1, 100), st.booleans()), min_size=1, max_size=6),
    st.floats(0.01, 100),
    st.randoms(use_true_random=False),
)
def test_any_number_of_metrics_ignores_units_and_reference_order(
    metrics: list[tuple[float, float, bool]], scale: float, rng: object
) -> None:
    names = [f"m{i}" for i in range(len(metrics))]
    values = {n: v for n, (v, _, _) in zip(names, metrics, strict=True)}
    stl = {n: s for n, (_, s, _) in zip(names, metrics, strict=True)}
    directions = {n: h for n, (_, _, h) in zip(names, metrics, strict=True)}
    base = delta_m(values, stl, directions)
    # every metric and its baseline in other units: the relative differences, hence Δm, do not change
    scaled = delta_m({n: v * scale for n, v in values.items()}, {n: s * scale for n, s in stl.items()}, directions)
    assert scaled == pytest.approx(base, rel=1e-9, abs=1e-9)
    order = list(reversed(names))
    assert delta_m(values, {n: stl[n] for n in order}, directions) == pytest.approx(base, rel=1e-12, abs=1e-12)


def test_ranks_with_ties_and_directions() -> None:
    assert ranks([0.9, 0.7, 0.9, 0.5], higher_is_better=True) == [1.5, 3.0, 1.5, 4.0]
    assert ranks([0.9, 0.7, 0.9, 0.5], higher_is_better=False) == [3.5, 2.0, 3.5, 1.0]
    assert ranks([1.0, math.nan, 2.0], higher_is_better=False) == [1.0, 3.0, 2.0]


def test_mean_ranks_hand_computed() -> None:
    table = {
        "ew": {"acc": 90.0, "err": 0.30},
        "igbv1": {"acc": 92.0, "err": 0.30},
        "nashmtl": {"acc": 91.0, "err": 0.20},
    }
    directions = {"acc": True, "err": False}
    # acc ranks: ew 3, igbv1 1, nashmtl 2; err ranks: ew 2.5, igbv1 2.5, nashmtl 1
    assert mean_ranks(table, directions) == {"ew": 2.75, "igbv1": 1.75, "nashmtl": 1.5}
    with pytest.raises(ValueError, match="missing for method"):
        mean_ranks({"ew": {"acc": 1.0}}, directions)
