"""The Balancer contract: validation, composition seam, result object, state."""

from __future__ import annotations

import io

import pytest
import torch

import taskbalance as tb
from taskbalance.engine import Engine
from tests.models import TinyMTL, make_data, task_losses


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _plain_backward(model: TinyMTL, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Every parameter's gradient from an ordinary backward of Σ L; the model's .grad are then cleared."""
    _, losses = task_losses(model, x, y)
    torch.autograd.backward(losses.sum())
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    return expected


def test_ew_equals_plain_sum_backward() -> None:
    model = TinyMTL()
    x, y = make_data()
    expected = _plain_backward(model, x, y)
    _, losses = task_losses(model, x, y)
    balancer = tb.make("ew", n_tasks=3)
    result = balancer.backward(losses, model.encoder.parameters())
    assert balancer._engine.last_path == "sum"  # Sum needs nothing: no per-task gradients
    for a, b in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(result.weights, torch.ones(3))
    torch.testing.assert_close(result.losses, losses.detach())


def test_engine_sum_path_equals_plain_backward() -> None:
    """The gradient-method seam (J, then Jᵀw, heads get ∇Σℓ̃) reproduces an ordinary backward for Sum."""
    model = TinyMTL()
    x, y = make_data()
    expected = _plain_backward(model, x, y)
    _, losses = task_losses(model, x, y)
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    balancer = tb.Balancer(n_tasks=3)
    engine = Engine()
    engine(losses, shared, heads, balancer.gradient)  # Sum, handed G: w = 1
    assert engine.last_path == "loop"  # the per-task path (CPU), not the plain backward
    for a, b in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(a, b)


def test_gradients_accumulate_like_backward() -> None:
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("ew", n_tasks=3)
    for _ in range(2):
        _, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters())
    twice = _grads(model)
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    torch.autograd.backward(2 * losses.sum())
    for a, b in zip(twice, _grads(model), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda losses: losses[:2], r"shape \(3,\)"),
        (lambda losses: losses.reshape(3, 1), r"shape \(3,\)"),
        (lambda losses: losses * torch.tensor([1.0, float("nan"), 1.0]), r"task\(s\) \[1\]"),
        (lambda losses: losses * torch.tensor([1.0, 1.0, float("inf")]), r"task\(s\) \[2\]"),
        (lambda losses: losses.detach(), "do not require grad"),
    ],
)
def test_bad_losses_raise_and_change_nothing(bad, message) -> None:  # type: ignore[no-untyped-def]
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("ew", n_tasks=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match=message):
        balancer.backward(bad(losses), model.encoder.parameters())
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def _saved(balancer: tb.Balancer) -> bytes:
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("engine", "features", "message"),
    [
        ("features", "detached", "not the output of a differentiable computation"),
        ("features", "none", "no features were given"),
        ("representation", "none", "no features were given"),
        ("features", "bypassed", r"positions \[4\] reach the losses without passing through features"),
    ],
)
def test_engine_refusal_comes_before_any_state_changes(engine: str, features: str, message: str) -> None:
    """A call the engine cannot serve raises before the loss method (IGBv1's baseline) or the call count moves."""
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("igbv1+mgda", n_tasks=3, engine=engine)
    z, losses = task_losses(model, x, y)
    balancer.backward(losses, model.encoder.parameters(), features=z)
    state, grads = _saved(balancer), _grads(model)
    z, losses = task_losses(model, x, y)
    shared = list(model.encoder.parameters())
    given = {"detached": z.detach(), "none": None, "bypassed": z}[features]
    if features == "bypassed":
        shared.append(next(model.heads.parameters()))  # head 0's weight: reaches its loss around z
    with pytest.raises(ValueError, match=message):
        balancer.backward(losses, shared, features=given)
    assert _saved(balancer) == state
    for a, b in zip(_grads(model), grads, strict=True):
        assert torch.equal(a, b)


def test_shared_parameter_without_gradient_path_is_refused() -> None:
    model = TinyMTL()
    x, y = make_data()
    stray = torch.nn.Parameter(torch.ones(2))
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match=r"positions \[4\] have no gradient path"):
        tb.make("ew", n_tasks=3).backward(losses, [*model.encoder.parameters(), stray])
    assert all(p.grad is None for p in model.parameters())


def test_frozen_shared_parameter_is_refused() -> None:
    model = TinyMTL()
    x, y = make_data()
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="do not require grad"):
        tb.make("ew", n_tasks=3).backward(losses, [torch.zeros(2)])


def test_sequence_of_scalars_is_accepted() -> None:
    model = TinyMTL()
    x, y = make_data()
    _, losses = task_losses(model, x, y)
    result = tb.make("ew", n_tasks=3).backward(list(losses), model.encoder.parameters())
    assert result.weights.shape == (3,)


def test_fixed_weights() -> None:
    model = TinyMTL()
    x, y = make_data()
    _, losses = task_losses(model, x, y)
    torch.autograd.backward(0.5 * losses[0] + 2.0 * losses[2])
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    tb.Balancer(loss=tb.Equal([0.5, 0.0, 2.0]), n_tasks=3).backward(losses, model.encoder.parameters())
    for a, b in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="2 fixed weights for 3 tasks"):
        tb.Balancer(loss=tb.Equal([1.0, 1.0]), n_tasks=3)


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="positive int"):
        tb.Balancer(n_tasks=0)
    with pytest.raises(ValueError, match="unknown engine"):
        tb.Balancer(n_tasks=2, engine="magic")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LossBalancer"):
        tb.Balancer(loss=tb.Sum(), n_tasks=2)  # type: ignore[arg-type]
