"""When vmap cannot run the backward graph: fall back to the loop, warn once, remember; and graph retention.

Also checks that the Gramian path really reduces each parameter's block inside its hook (J never assembled).
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import pytest
import torch
from torch import Tensor, nn

from taskbalance.engine import Engine, EngineFallbackWarning, vjp
from tests.engine.helpers import make_method, tolerances


class ValueBranch(torch.autograd.Function):
    """Identity whose backward reads a value (``.item()``): fine in a plain backward, impossible under vmap."""

    batchable = False  # the test of a late failure flips this

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        if ValueBranch.batchable:
            return grad
        return grad * float(grad.abs().sum().item() >= 0)  # always 1, but vmap cannot run `.item()`


def value_branch(x: Tensor) -> Tensor:
    """``ValueBranch.apply(x)`` with a type: torch 2.13 leaves ``Function.apply`` unannotated."""
    return cast(Tensor, ValueBranch.apply(x))  # type: ignore[no-untyped-call]


class Unbatchable(nn.Module):
    """MLP trunk with the value-reading identity inside (``where="trunk"``) or inside head 0 (``"head"``)."""

    def __init__(self, k: int, where: str) -> None:
        super().__init__()
        self.where = where
        self.first = nn.Linear(5, 8)
        self.second = nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k))

    def shared(self) -> list[Tensor]:
        return [*self.first.parameters(), *self.second.parameters()]

    def losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.first(x))
        z = torch.tanh(self.second(value_branch(h) if self.where == "trunk" else h))
        outputs = [head(z).squeeze(-1) for head in self.heads]
        if self.where == "head":
            outputs[0] = value_branch(outputs[0])
        # one vectorised loss: the heads phase cannot split the tasks and must run the heads K-batched
        return z, (torch.stack(outputs, dim=1) - y).pow(2).mean(0) * torch.arange(1.0, len(outputs) + 1).double()


def setup(where: str, k: int = 3) -> tuple[Unbatchable, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Unbatchable(k, where).double()
    return model, torch.randn(8, 5, dtype=torch.float64), torch.randn(8, k, dtype=torch.float64)


def step(model: Unbatchable, x: Tensor, y: Tensor, engine: Engine, kind: str = "weights") -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    z, balanced = model.losses(x, y)
    engine(balanced, model.shared(), list(model.heads.parameters()), make_method(kind, 3, torch.float64), z)
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("where", ["trunk", "head"])
@pytest.mark.parametrize("path", ["batched", "features", "gramian"])
def test_fallback_gives_the_loop_result_and_warns_once(path: str, where: str) -> None:
    model, x, y = setup(where)
    expected = step(model, x, y, Engine("loop"))
    engine = Engine(path)  # type: ignore[arg-type]
    with pytest.warns(EngineFallbackWarning, match=r"vmap cannot run this backward graph .*item"):
        first = step(model, x, y, engine)
    assert engine.fell_back
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        second = step(model, x, y, engine)
    for a, b, want in zip(first, second, expected, strict=True):
        torch.testing.assert_close(a, want, **tolerances(torch.float64))
        assert torch.equal(a, b)
    engine.reset()
    assert not engine.fell_back


@pytest.mark.parametrize("path", ["heuristic", "auto"])
def test_the_rule_on_cpu_takes_the_trunk_one_task_at_a_time(path: str) -> None:
    """No vmap through the trunk on the CPU (so nothing to fall back from there); the heads still use it. The
    trial of "auto" tries vmap through the trunk too, and its failure there is silent: not the user's choice."""
    for where, warns in (("trunk", False), ("head", True)):
        model, x, y = setup(where)
        expected = step(model, x, y, Engine("loop"))
        engine = Engine(path)  # type: ignore[arg-type]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = step(model, x, y, engine)
        assert engine.last_path == "features_loop"
        assert any(issubclass(w.category, EngineFallbackWarning) for w in caught) == warns
        for a, want in zip(got, expected, strict=True):
            torch.testing.assert_close(a, want, **tolerances(torch.float64))


def test_graph_is_kept_until_vmap_is_known_to_work_then_freed() -> None:
    """The first batched step keeps the graph (a failure could need it); later steps free it like backward()."""
    ValueBranch.batchable = True
    try:
        model, x, y = setup("trunk")
        engine = Engine("batched")
        for attempt in range(2):
            model.zero_grad(set_to_none=True)
            _, balanced = model.losses(x, y)
            engine(balanced, model.shared(), list(model.heads.parameters()), make_method("weights", 3, torch.float64))
            if attempt == 0:
                torch.autograd.backward(balanced.sum())  # still there
            else:
                with pytest.raises(RuntimeError, match="second time"):
                    torch.autograd.backward(balanced.sum())
        assert not engine.fell_back
    finally:
        ValueBranch.batchable = False


def test_failure_after_success_on_a_freed_graph_is_a_clear_error() -> None:
    ValueBranch.batchable = True
    try:
        model, x, y = setup("trunk")
        engine = Engine("batched")
        step(model, x, y, engine)
        ValueBranch.batchable = False
        with pytest.raises(RuntimeError, match=r"worked on earlier steps.*engine='loop'"):
            step(model, x, y, engine)
    finally:
        ValueBranch.batchable = False


def test_loop_path_never_tries_vmap() -> None:
    model, x, y = setup("trunk")
    engine = Engine("loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, x, y, engine)
    assert not engine.fell_back


def test_gramian_blocks_are_reduced_in_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shared block becomes its contribution to G inside a hook and a one-element stand-in for autograd."""
    ValueBranch.batchable = True
    seen: list[torch.Size] = []
    stand_in = vjp._stand_in

    def spy(grad: Tensor) -> Tensor:
        seen.append(grad.shape)
        out = stand_in(grad)
        assert out.untyped_storage().nbytes() == out.element_size()
        return out

    monkeypatch.setattr(vjp, "_stand_in", spy)
    try:
        model, x, y = setup("trunk")
        expected = step(model, x, y, Engine("loop"))
        got = step(model, x, y, Engine("gramian"))
    finally:
        ValueBranch.batchable = False
    assert sorted(seen) == sorted(p.shape for p in model.shared())
    for a, want in zip(got, expected, strict=True):
        torch.testing.assert_close(a, want, **tolerances(torch.float64))
    assert all(not p._backward_hooks for p in model.parameters())
