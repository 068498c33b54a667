"""The declared state of every registered method: a saved state loads only into the same method, options and K.

Loading is all-or-nothing: a refused state leaves the target exactly as it was. A loaded state continues the run
it was saved from bit for bit.
"""

from __future__ import annotations

import copy
import functools
import io
import itertools
import re
from collections.abc import Mapping
from typing import Any

import pytest
import torch

import taskbalance as tb
from taskbalance.method import Method, fields
from taskbalance.registry import GRADIENT_METHODS, LOSS_METHODS
from tests.models import TinyMTL, make_data, task_losses

#: options that make a few steps reach every phase: STCH past its warm-up, IGBv2 through SAC training into the policy
OPTIONS: dict[str, dict[str, Any]] = {
    "stch": {"warmup_epochs": 1},
    "igbv2": {
        "base_epoch": 0,
        "train_epoch": 1,
        "policy_epoch": 2,
        "update_every": 2,
        "batch_size": 4,
        "buffer_size": 16,
        "hidden": (8,),
    },
}
SEEDED = {"rlw", "igbv2", "pcgrad", "gradvac", "graddrop"}
#: one changed option per loss method that has one (every gradient method has max_norm)
OTHER_OPTION: dict[str, dict[str, Any]] = {
    "ew": {"weights": [1.0, 2.0, 3.0]},
    "si": {"eps": 1e-8},
    "uw": {"init": 0.5},
    "dwa": {"temperature": 3.0},
    "rlw": {"log_losses": True},
    "imtl_l": {"init": 0.5},
    "famo": {"w_lr": 0.1},
    "stch": {"mu": 2.0},
    "igbv1": {"base_epoch": 3},
    "igbv2": {"policy_epoch": 3},
}
EPOCHS, BATCHES, BATCH = 3, 2, 8
X, Y = make_data(n=BATCHES * BATCH)


def _spec(name: str) -> str:
    return name if name in LOSS_METHODS else f"ew+{name}"


def _method(balancer: tb.Balancer, name: str) -> Method:
    return balancer.loss if name in LOSS_METHODS else balancer.gradient


def _build(name: str, n_tasks: int = 3, seed: int = 0, **options: Any) -> tb.Balancer:
    seeded = {"seed": seed} if name in SEEDED else {}
    return tb.make(_spec(name), n_tasks=n_tasks, **{**OPTIONS.get(name, {}), **seeded, **options})


def _step(model: TinyMTL, balancer: tb.Balancer, batch: int) -> tb.BalanceResult:
    """One training step of the run: backward, SGD step, after_step with the updated model."""
    x, y = X[batch * BATCH : (batch + 1) * BATCH], Y[batch * BATCH : (batch + 1) * BATCH]
    result = balancer.backward(task_losses(model, x, y)[1], model.encoder.parameters())
    with torch.no_grad():
        for p in [*model.parameters(), *balancer.parameters()]:
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
                p.grad = None
        balancer.after_step(task_losses(model, x, y)[1])
    return result


def _train(name: str, seed: int = 0) -> tuple[TinyMTL, tb.Balancer]:
    model, balancer = TinyMTL(), _build(name, seed=seed)
    for _ in range(EPOCHS):
        for batch in range(BATCHES):
            _step(model, balancer, batch)
        balancer.end_epoch()
    return model, balancer


@functools.cache
def _used(name: str) -> Method:
    """The method after a short run (shared by the refusal tests, which must leave it unchanged)."""
    return _method(_train(name)[1], name)


def _flat(state: Any, path: str = "") -> dict[str, Any]:
    """Nested state as {path: leaf}."""
    if isinstance(state, Mapping):
        children: Any = state.items()
    elif isinstance(state, list | tuple):
        children = enumerate(state)
    else:
        return {path: state}
    return {key: leaf for name, child in children for key, leaf in _flat(child, f"{path}/{name}").items()}


def _assert_same(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    a, b = _flat(actual), _flat(expected)
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _roundtrip(state: Mapping[str, Any]) -> Any:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _ordered_pairs(names: list[str]) -> list[tuple[str, str]]:
    return list(itertools.permutations(names, 2))


@pytest.mark.parametrize(
    ("source", "target"), _ordered_pairs(list(LOSS_METHODS)) + _ordered_pairs(list(GRADIENT_METHODS))
)
def test_another_methods_state_is_refused_and_changes_nothing(source: str, target: str) -> None:
    method = _used(target)
    before = copy.deepcopy(method.state_dict())
    with pytest.raises(ValueError, match=f"state is for {type(_used(source)).__name__}"):
        method.load_state_dict(_used(source).state_dict())
    _assert_same(method.state_dict(), before)


@pytest.mark.parametrize("name", [*OTHER_OPTION, *GRADIENT_METHODS])
def test_the_same_method_with_other_options_is_refused(name: str) -> None:
    other = OTHER_OPTION.get(name, {"max_norm": 5.0})
    saved = _method(_build(name, **other), name).state_dict()
    method = _method(_build(name), name)
    before = copy.deepcopy(method.state_dict())
    option = next(iter(other))
    with pytest.raises(ValueError, match=f"state is for {type(method).__name__}\\({option}="):
        method.load_state_dict(saved)
    _assert_same(method.state_dict(), before)


def test_every_loss_method_with_options_is_checked_for_them() -> None:
    assert set(LOSS_METHODS) - set(OTHER_OPTION) == {"gls"}  # GLS has no options


def test_the_refusal_names_the_difference() -> None:
    saved = tb.make("igbv1", n_tasks=3, base_epoch=3).loss.state_dict()
    with pytest.raises(ValueError, match=re.escape("state is for IGBv1(base_epoch=3), this is IGBv1(base_epoch=1)")):
        tb.make("igbv1", n_tasks=3).loss.load_state_dict(saved)


@pytest.mark.parametrize("name", [*LOSS_METHODS, *GRADIENT_METHODS])
def test_a_state_for_another_number_of_tasks_is_refused(name: str) -> None:
    saved = _method(_build(name, n_tasks=3), name).state_dict()
    method = _method(_build(name, n_tasks=2), name)
    before = copy.deepcopy(method.state_dict())
    with pytest.raises(ValueError, match=r"\(n_tasks=3\), this is \w+\(n_tasks=2\)"):
        method.load_state_dict(saved)
    _assert_same(method.state_dict(), before)


@pytest.mark.parametrize("name", [*LOSS_METHODS, *GRADIENT_METHODS])
def test_a_loaded_state_continues_the_run_exactly(name: str) -> None:
    model, balancer = _train(name, seed=0)
    resumed = _build(name, seed=1)  # a seed is restored from the state, not checked
    resumed.load_state_dict(_roundtrip(balancer.state_dict()))
    resumed_model = copy.deepcopy(model)
    for batch in range(BATCHES):
        expected, actual = _step(model, balancer, batch), _step(resumed_model, resumed, batch)
        assert torch.equal(expected.weights, actual.weights), batch
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    _assert_same(resumed.state_dict(), balancer.state_dict())


def test_incomplete_or_unlabelled_states_are_clear_errors() -> None:
    method = tb.make("ew+upgrad", n_tasks=3).gradient
    state = method.state_dict()
    del state["_extra_state"]["warm"]
    with pytest.raises(ValueError, match=r"missing \['warm'\]"):
        method.load_state_dict(state)
    with pytest.raises(ValueError, match="does not say which method"):
        method.load_state_dict({"_extra_state": {"n_tasks": 3, "warm": None}})


def test_declarations_add_up_and_initial_values_come_back_on_reset() -> None:
    class Counting(tb.LossBalancer):
        options = ("scale",)
        state = fields("_history", count=0)

        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale
            self._history: list[int] = []

        def balance(self, losses: torch.Tensor) -> tb.Balanced:
            self.count += 1
            return tb.Balanced(losses=self.scale * losses, weights=torch.ones_like(losses))

    method = Counting(scale=2.0)
    method.setup(2)
    method(torch.ones(2))
    assert repr(method) == "Counting(n_tasks=2, scale=2.0)"
    assert method.state_dict()["_extra_state"] == {
        "method": "Counting",
        "options": {"n_tasks": 2, "scale": 2.0},
        "history": [],
        "count": 1,
    }
    method.reset()
    assert method.count == 0
    with pytest.raises(TypeError, match="must be None, a bool"):
        fields(tensor=torch.zeros(1))


def test_a_refusal_inside_a_nested_object_leaves_the_method_as_it_was() -> None:
    """IGBv2's state passes its own check, then its agent's buffer has the wrong shape: the generator and the
    baseline, loaded before the agent, are put back (``Declared.load_state_dict`` is one transaction)."""
    method = _used("igbv2")
    before = copy.deepcopy(method.state_dict())
    state = _method(_train("igbv2", seed=1)[1], "igbv2").state_dict()
    agent = state["_extra_state"]["agent"]
    agent["buffer.states"] = agent["buffer.states"][:-1]
    with pytest.raises(RuntimeError, match=r"size mismatch for buffer\.states"):
        method.load_state_dict(state)
    _assert_same(method.state_dict(), before)


@pytest.mark.parametrize(("spec", "field"), [("dbmtl", "_ema"), ("moco", "tracked")])
def test_a_replaced_field_is_kept_by_reference_and_still_restored_when_a_step_fails(spec: str, field: str) -> None:
    """DB-MTL's ĝ and MoCo's y (K × P each) are written into a spare buffer, never in place, so a step's snapshot
    keeps them by reference (no K × P copy per step) while state_dict() still copies; a step that fails after the
    method combined restores the field exactly, and the run then continues as if the failure had not happened.
    Fails if the field is written in place (the restored value would be the failed step's)."""
    from taskbalance.gradient_balancing.base import Combination
    from taskbalance.method import snapshot

    x, y = make_data()
    runs = []
    for fail_at in (None, 2, 3):
        model, balancer = TinyMTL(), tb.make(spec, n_tasks=3, engine="heuristic")
        method = balancer.gradient
        assert field in type(method).replaced
        grads = []
        for step in range(6):
            model.zero_grad(set_to_none=True)
            z, losses = task_losses(model, x, y)
            if step == fail_at:
                value = getattr(method, field)
                assert snapshot(balancer)["gradient._extra_state"][field.lstrip("_")] is value  # by reference
                assert balancer.state_dict()["gradient._extra_state"][field.lstrip("_")] is not value  # a copy
                before, combine = value.clone(), method.combine

                def fails_after(matrix: torch.Tensor, losses: torch.Tensor, combine: Any = combine) -> Combination:
                    combine(matrix, losses)  # the new value written and swapped in, then the step fails
                    raise RuntimeError("after the method combined")

                method.combine = fails_after  # type: ignore[method-assign]
                with pytest.raises(RuntimeError, match="after the method combined"):
                    balancer.backward(losses, model.encoder.parameters(), features=z)
                del method.combine
                assert torch.equal(getattr(method, field), before)
                model.zero_grad(set_to_none=True)
                z, losses = task_losses(model, x, y)
            balancer.backward(losses, model.encoder.parameters(), features=z)
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        runs.append(grads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
