"""Spec options are read by the type their method declares (a regression of specs read as Python literals)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.spec_options import OptionError, read_option, split_top_level


@pytest.mark.parametrize("word", ["false", "False", "no", "off", "0", "FALSE"])
def test_false_words_turn_log_losses_off(word: str) -> None:
    assert tb.make(f"uw[log_losses={word}]", n_tasks=2).loss.log_losses is False


@pytest.mark.parametrize("word", ["true", "yes", "ON", "1"])
def test_true_words_turn_log_losses_on(word: str) -> None:
    assert tb.make(f"uw[log_losses={word}]", n_tasks=2).loss.log_losses is True


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cagrad[c=abc]", "option c='abc' of cagrad: expected a number"),
        ("rlw[seed=abc]", "option seed='abc' of rlw: expected an integer or none"),
        ("igbv1[base_epoch=2.5]", "option base_epoch='2.5' of igbv1: expected an integer"),
        ("uw[log_losses=maybe]", "option log_losses='maybe' of uw: expected a boolean"),
        ("mgda[normalization=l3]", "option normalization='l3' of mgda: expected one of 'none', 'l2'"),
        ("nashmtl[update_weights_every=often]", "option update_weights_every='often' of Balancer: expected an integer"),
        ("ew[weights=1]", "option weights='1' of ew: expected a sequence written in parentheses"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_name(spec: str, message: str) -> None:
    with pytest.raises(OptionError, match="^" + message.replace("(", r"\(").replace("+", r"\+")):
        tb.make(spec, n_tasks=2)


def test_typed_values_reach_the_methods() -> None:
    balancer = tb.make("igbv1+cagrad[c=0.25,max_norm=none,update_weights_every=3]", n_tasks=2)
    assert balancer.gradient.c == 0.25 and isinstance(balancer.gradient.c, float)
    assert balancer.gradient.max_norm is None
    assert balancer.update_weights_every == 3
    parameter = torch.ones(2, requires_grad=True)
    result = tb.make("ew[weights=(1, 2.5)]", n_tasks=2).backward(parameter * 2.0, shared_params=[parameter])
    assert result.weights.tolist() == [1.0, 2.5]


def test_a_keyword_overrides_the_spec_without_being_parsed() -> None:
    assert tb.make("cagrad[c=0.1]", n_tasks=2, c=0.7).gradient.c == 0.7


def test_an_option_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        tb.make("cagrad[c=0.1,c=0.2]", n_tasks=2)


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_integers_read_back(value: int) -> None:
    assert read_option(str(value), int, option="n", owner="m") == value
    assert read_option(str(value), int | None, option="n", owner="m") == value


@given(st.floats(allow_nan=False))
def test_floats_read_back_exactly(value: float) -> None:
    assert read_option(repr(value), float, option="x", owner="m") == value


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=5))
def test_sequences_read_back(values: list[float]) -> None:
    text = "(" + ", ".join(repr(v) for v in values) + ")"
    assert read_option(text, Sequence[float], option="w", owner="m") == tuple(values)


def test_literal_and_none() -> None:
    choice = Literal["a", "b"]
    assert read_option("b", choice, option="o", owner="m") == "b"
    assert read_option("'b'", choice, option="o", owner="m") == "b"
    assert read_option('"b"', choice, option="o", owner="m") == "b"
    assert read_option("None", float | None, option="o", owner="m") is None
    assert read_option("null", float | None, option="o", owner="m") is None


def test_split_top_level_keeps_nested_commas() -> None:
    assert split_top_level("ew[weights=(1, 2)], cagrad[c=0.5,max_norm=1.0],,igbv1") == [
        "ew[weights=(1, 2)]",
        "cagrad[c=0.5,max_norm=1.0]",
        "igbv1",
    ]
