"""FAMO: ℓ̃ = (z/c) log D and the Adam update of the logits from the log-loss decrease."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb

positive = st.floats(min_value=1e-3, max_value=1e3)


def _famo(k: int, **options: object) -> tb.FAMO:
    method = tb.FAMO(**options)  # type: ignore[arg-type]
    method.setup(k)
    return method


def test_hand_computed_balance() -> None:
    method = _famo(2, eps=0.0)
    out = method(torch.tensor([1.0, 3.0]))
    # z = (1/2, 1/2), c = 1/2 + 1/6 = 2/3, weights z / c = 3/4; multipliers of ∇L: (3/4, 1/4)
    torch.testing.assert_close(out.weights, torch.tensor([0.75, 0.75]))
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 0.75 * math.log(3.0)]))
    torch.testing.assert_close(out.weights / torch.tensor([1.0, 3.0]), torch.tensor([0.75, 0.25]))


def test_hand_computed_logit_update() -> None:
    method = _famo(2, eps=0.0)
    method(torch.tensor([1.0, 3.0]))
    method.after_step(torch.tensor([0.5, 2.7]))
    # δ = (log 2, log(3/2.7)); gradient z ⊙ (δ − zᵀδ) = ±(δ₁ − δ₂)/4; a first Adam step moves by lr · g / (|g| + 1e-8)
    g = (math.log(2.0) - math.log(3.0 / 2.7)) / 4
    step = 0.025 * g / (abs(g) + 1e-8)
    torch.testing.assert_close(method.logits, torch.tensor([-step, step]))
    # the task that improved more now has the smaller weight
    z = torch.softmax(method.logits, dim=0)
    assert z[0] < z[1]


def test_logit_updates_match_torch_adam_on_the_reference_objective() -> None:
    """Many steps with weight decay: same logits as torch.optim.Adam on grad of softmax(ξ)·δ (the reference)."""
    gen = torch.Generator().manual_seed(0)
    method = _famo(3, w_lr=0.05, gamma=0.01, min_losses=[0.1, 0.0, 0.2])
    xi = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([xi], lr=0.05, weight_decay=0.01)
    floor = torch.tensor([0.1, 0.0, 0.2])
    for _ in range(20):
        before = 0.3 + torch.rand(3, generator=gen) * 2
        after = before * (0.7 + 0.5 * torch.rand(3, generator=gen))
        method(before)
        method.after_step(after)
        delta = torch.log(before - floor + 1e-8) - torch.log(after - floor + 1e-8)
        (grad,) = torch.autograd.grad(F.softmax(xi, -1), xi, grad_outputs=delta)
        xi.grad = grad
        adam.step()
    torch.testing.assert_close(method.logits, xi.detach())


@given(st.lists(st.tuples(positive, st.floats(0.2, 1.5), positive), min_size=1, max_size=5), st.permutations(range(5)))
def test_update_defined_below_one_and_invariant_to_loss_scaling(
    rows: list[tuple[float, float, float]], perm: list[int]
) -> None:
    """Losses far below 1 give a finite update; with L* = 0 and ε = 0 it ignores per-task scales.

    One update from the initial logits: Adam divides by the gradient's magnitude, so over several steps a
    gradient component that is zero up to rounding (equal decreases) may move by up to w_lr, for any scaling.
    """
    k = len(rows)
    before = torch.tensor([r[0] for r in rows], dtype=torch.float64) * 1e-3
    after = before * torch.tensor([r[1] for r in rows], dtype=torch.float64)
    scale = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    order = [i for i in perm if i < k]
    results = []
    for b, a in ((before, after), (before * scale, after * scale), (before[order], after[order])):
        method = _famo(k, eps=0.0).double()
        weights = method(b).weights
        method.after_step(a)
        assert bool(torch.isfinite(method.logits).all())
        results.append((method.logits.clone(), weights / b))
    # scaling changes the gradient only by float64 rounding (~1e-15 on log ratios of order 1); Adam's first step
    # moves ξ by w_lr·g/(|g| + 1e-8), so a component that is zero up to rounding moves by up to w_lr·1e-7
    torch.testing.assert_close(results[1][0], results[0][0], atol=0.025 * 1e-6, rtol=0)
    torch.testing.assert_close(results[2][0], results[0][0][order])
    torch.testing.assert_close(results[2][1], results[0][1][order])
    # tasks that improved more than the (uniformly weighted) mean lose logit, the others gain
    offset = torch.log(before / after)
    offset = offset - offset.mean()
    clear = offset.abs() > 1e-6
    assert torch.equal(torch.sign(results[0][0][clear]), -torch.sign(offset[clear]))


def test_without_after_step_it_is_scale_invariant_log_loss() -> None:
    method = _famo(3, eps=0.0)
    losses = torch.tensor([0.5, 2.0, 8.0])
    for _ in range(3):
        out = method(losses)
    multipliers = out.weights / losses
    torch.testing.assert_close(multipliers, (1 / losses) / (1 / losses).sum())
    torch.testing.assert_close(method.logits, torch.zeros(3))


def test_errors() -> None:
    method = _famo(2)
    with pytest.raises(RuntimeError, match="after_step"):
        method.after_step(torch.ones(2))
    method(torch.ones(2))
    method.after_step(torch.ones(2))
    with pytest.raises(RuntimeError, match="after_step"):
        method.after_step(torch.ones(2))
    floored = _famo(2, min_losses=[0.5, 0.0])
    with pytest.raises(ValueError, match=r"task\(s\) \[0\]"):
        floored(torch.tensor([0.4, 1.0]))
    with pytest.raises(ValueError, match="min_losses"):
        _famo(3, min_losses=[0.0, 0.0])
    for bad in ({"w_lr": -1.0}, {"gamma": float("nan")}, {"eps": -1e-8}, {"min_losses": [-1.0, 0.0]}):
        with pytest.raises(ValueError):
            tb.FAMO(**bad)  # type: ignore[arg-type]


def test_logits_are_state_not_parameters() -> None:
    balancer = tb.make("famo", n_tasks=2)
    assert list(balancer.parameters()) == []
    assert "loss.logits" in balancer.state_dict()
    balancer.loss(torch.tensor([1.0, 2.0]))
    balancer.after_step(torch.tensor([0.5, 2.0]))
    famo = balancer.loss
    assert isinstance(famo, tb.FAMO)
    assert not torch.equal(famo.logits, torch.zeros(2))
    balancer.reset()
    torch.testing.assert_close(balancer.loss.logits, torch.zeros(2))
