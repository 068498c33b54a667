"""``engine="auto"`` measured: the trial's steps are the rule's to the bit, the fastest path is kept (beyond the
margin), the choice is per signature and survives a state_dict, and failing challengers leave silently."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, cast

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import taskbalance as tb
from taskbalance.engine import Engine, paths
from taskbalance.engine.tuning import MARGIN, TRIAL_STEPS, PathTuner, Trial, decide, signature
from tests.engine.helpers import tolerances
from tests.engine.test_vjp import setup as vjp_setup
from tests.engine.test_vjp import step as vjp_step
from tests.models import TinyMTL, make_data, task_losses

CANDIDATES = ["features_loop", "features", "loop", "batched"]


# -- the decision ------------------------------------------------------------------------------------------------
times = st.dictionaries(
    st.sampled_from(CANDIDATES), st.floats(1e-6, 1.0, allow_nan=False), min_size=1, max_size=len(CANDIDATES)
)


@given(times, st.floats(1e-3, 1e3))
def test_the_decision_keeps_the_incumbent_unless_beaten_by_the_margin(best: dict[str, float], unit: float) -> None:
    incumbent = next(iter(best))
    choice = decide(best, incumbent)
    fastest = min(best.values())
    if choice == incumbent:
        assert fastest >= (1 - MARGIN) * best[incumbent]
    else:
        assert best[choice] == fastest < (1 - MARGIN) * best[incumbent]
    # the same in any unit of time
    assert decide({c: t * unit for c, t in best.items()}, incumbent) == choice


def test_a_trial_warms_up_drops_the_far_slower_and_decides_after_its_steps() -> None:
    trial = Trial("features_loop", list(CANDIDATES))
    seen_first = []
    for step in range(TRIAL_STEPS):
        order = trial.order()
        seen_first.append(order[0])
        for candidate in order:
            warm_up = {"features_loop": 1.0, "features": 0.5, "loop": 3.0, "batched": 0.9}
            timed = {"features_loop": 1.0, "features": 0.9, "loop": 0.1, "batched": 0.5}
            trial.record(candidate, (warm_up if step == 0 else timed)[candidate])
        choice = trial.end_step()
        assert (choice is None) == (step < TRIAL_STEPS - 1)
    assert set(seen_first) == {"features_loop", "features", "batched"}  # rotates over those left: none always first
    assert set(trial.dropped) == {"loop"}  # 6x the fastest in the warm-up: its later 0.1 s never counted
    assert choice == "batched"


def test_the_incumbent_never_leaves_its_trial() -> None:
    trial = Trial("loop", ["loop", "batched"])
    trial.drop("loop", "slow")
    trial.record("loop", 10.0)
    trial.record("batched", 1.0)
    trial.end_step()
    assert "loop" not in trial.dropped and "loop" in trial.order()


def test_the_signature_ignores_the_batch_and_sees_the_rest() -> None:
    theta = [torch.zeros(4, 3), torch.zeros(4)]
    losses = torch.zeros(3)

    def key(batch: int = 8, width: int = 4, k: int = 3, cut: bool = True, gramian: bool = False) -> str:
        return signature(torch.zeros(k), theta, torch.zeros(batch, width), cut, gramian)

    assert key(batch=8) == key(batch=5)  # a smaller last batch keeps the choice
    assert len({key(), key(width=5), key(k=2), key(cut=False), key(gramian=True)}) == 5
    assert signature(losses, theta[:1], None, False, False) != signature(losses, theta, None, False, False)
    threads, before = torch.get_num_threads(), key()
    try:
        torch.set_num_threads(threads + 1)
        assert key() != before  # another thread count: its own choice
    finally:
        torch.set_num_threads(threads)
    assert key() == before


# -- in the engine -------------------------------------------------------------------------------------------------
def _steps(balancer: tb.Balancer, model: TinyMTL, n: int, x: Tensor, y: Tensor) -> Iterator[list[Tensor]]:
    """n balanced steps on the same batch (no optimizer: every step sees the same graph), each step's grads."""
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        features, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters(), features=features)
        yield [cast(Tensor, p.grad).clone() for p in model.parameters()]


@pytest.fixture
def fake_times(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Replace each candidate's measured time by the seconds set in the returned dict (missing: the real time)."""
    fake: dict[str, float] = {}
    record = Trial.record

    def faked(self: Trial, candidate: str, seconds: float) -> None:
        record(self, candidate, fake.get(candidate, seconds))

    monkeypatch.setattr(Trial, "record", faked)
    return fake


@pytest.mark.parametrize("gradient", ["mgda", "dbmtl"])  # reads G (the Gramian path is timed too) / reads J
def test_trial_steps_are_the_rules_steps_to_the_bit(gradient: str) -> None:
    x, y = make_data()
    rule, auto = TinyMTL(), TinyMTL()
    by_rule = tb.make(gradient, n_tasks=3, engine="heuristic")
    by_auto = tb.make(gradient, n_tasks=3, engine="auto")
    both = zip(_steps(by_rule, rule, TRIAL_STEPS, x, y), _steps(by_auto, auto, TRIAL_STEPS, x, y), strict=True)
    for want, got in both:
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    (key,) = by_auto.path_tuner.chosen
    timed = by_auto.path_tuner.timings[key]
    assert set(timed) | set(by_auto.path_tuner.dropped[key]) == {
        *CANDIDATES,
        *(["gramian"] if gradient == "mgda" else []),
    }


def test_the_fastest_path_is_kept_and_gives_the_same_gradients(fake_times: dict[str, float]) -> None:
    fake_times.update({"features_loop": 1.0, "features": 2.0, "loop": 1.5, "batched": 0.5, "gramian": 3.0})
    x, y = make_data()
    model = TinyMTL()
    balancer = tb.make("upgrad", n_tasks=3)
    grads = list(_steps(balancer, model, TRIAL_STEPS + 1, x, y))
    assert balancer._engine.last_path == "batched"
    assert list(balancer.path_tuner.chosen.values()) == ["batched"]
    for a, b in zip(grads[0], grads[-1], strict=True):
        torch.testing.assert_close(a, b)


def test_a_challenger_within_the_margin_does_not_replace_the_rule(fake_times: dict[str, float]) -> None:
    fake_times.update({"features_loop": 1.0, "features": 1.0 - MARGIN / 2, "loop": 3.0, "batched": 3.0, "gramian": 3.0})
    x, y = make_data()
    balancer = tb.make("mgda", n_tasks=3)
    list(_steps(balancer, TinyMTL(), TRIAL_STEPS + 1, x, y))
    assert balancer._engine.last_path == "features_loop"


def test_the_choice_is_in_the_state_dict_and_a_resume_takes_it(fake_times: dict[str, float]) -> None:
    fake_times.update({"features_loop": 1.0, "features": 0.2, "loop": 3.0, "batched": 3.0, "gramian": 3.0})
    x, y = make_data()
    model, copy = TinyMTL(), TinyMTL()
    balancer = tb.make("nashmtl", n_tasks=3)
    *_, after = _steps(balancer, model, TRIAL_STEPS + 1, x, y)
    assert balancer._engine.last_path == "features"
    resumed = tb.make("nashmtl", n_tasks=3)
    resumed.load_state_dict(balancer.state_dict())
    fake_times.clear()  # the resumed run measures nothing: it takes the saved choice on its first step
    (first,) = _steps(resumed, copy, 1, x, y)
    assert resumed._engine.last_path == "features" and not resumed.path_tuner.trials
    (next_step,) = _steps(balancer, model, 1, x, y)
    assert all(torch.equal(a, b) for a, b in zip(first, next_step, strict=True))
    assert len(after) == len(first)


def test_a_new_signature_is_timed_again_and_a_smaller_batch_is_not() -> None:
    x, y = make_data(n=32)
    model = TinyMTL()
    balancer = tb.make("mgda", n_tasks=3)
    list(_steps(balancer, model, TRIAL_STEPS, x, y))
    list(_steps(balancer, model, 1, x[:7], y[:7]))
    assert len(balancer.path_tuner.chosen) == 1 and not balancer.path_tuner.trials
    _, losses = task_losses(model, x, y)
    balancer.backward(losses, list(model.encoder.parameters())[:2], features=None)  # another θ, no features
    assert len(balancer.path_tuner.trials) == 1


def test_deterministic_algorithms_take_the_rule_without_timing() -> None:
    x, y = make_data()
    balancer = tb.make("mgda", n_tasks=3)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        list(_steps(balancer, TinyMTL(), 2, x, y))
    finally:
        torch.use_deterministic_algorithms(before)
    assert balancer._engine.last_path == "features_loop"
    assert not balancer.path_tuner.trials and not balancer.path_tuner.chosen


def test_challengers_that_vmap_cannot_run_leave_silently() -> None:
    """The trunk reads a value in its backward: every vmap path fails in the trial, without a word to the user."""
    model, x, y = vjp_setup("trunk")
    expected = vjp_step(model, x, y, Engine("loop"), kind="direction")
    engine = Engine("auto")
    for _ in range(TRIAL_STEPS + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = vjp_step(model, x, y, engine, kind="direction")
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, **tolerances(torch.float64))
    (dropped,) = engine.tuner.dropped.values()
    assert set(dropped) == {"features", "batched"} and all("vmap cannot run" in why for why in dropped.values())
    assert engine.last_path in ("features_loop", "loop")


class LoopedUnderVmap(torch.autograd.Function):
    """Identity whose backward says what torch says of an op without a batching rule, when it runs under vmap."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        if torch._C._functorch.is_batchedtensor(grad):
            warnings.warn(
                "There is a performance drop because we have not yet implemented the batching rule for aten::x.",
                UserWarning,
                stacklevel=1,
            )
        return grad


def test_challengers_for_which_vmap_has_no_batching_rule_leave_silently() -> None:
    """As QM9's GRU backward under the Gramian path's vmap: torch's warning is the trial's, not the user's."""
    x, y = make_data()
    model = TinyMTL()
    balancer = tb.make("mgda", n_tasks=3)
    for _ in range(TRIAL_STEPS):
        model.zero_grad(set_to_none=True)
        features = cast(Tensor, LoopedUnderVmap.apply(model.encoder(x)))  # type: ignore[no-untyped-call]
        outputs = [head(features).squeeze(-1) for head in model.heads]
        losses = torch.stack([(out - y[:, k]).pow(2).mean() for k, out in enumerate(outputs)])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the user sees nothing of the trial
            balancer.backward(losses, model.encoder.parameters(), features=features)
    (dropped,) = balancer.path_tuner.dropped.values()
    # the Gramian path's torch.func.vmap runs the backward batched, and warns (is_grads_batched does not here)
    assert "no batching rule" in dropped["gramian"]


def test_reset_and_a_foreign_state_are_handled() -> None:
    tuner = PathTuner()
    tuner.chosen["key"] = "loop"
    tuner.reset()
    assert not tuner.chosen
    with pytest.raises(ValueError, match="auto_paths"):
        tuner.load({"auto_paths": {"key": "fast"}})
    tuner.load({})  # a state saved before "auto" measured: nothing chosen yet
    assert not tuner.chosen
    assert paths.TIMED_PATHS == ("features_loop", "features", "loop", "batched", "gramian")
