"""DB-MTL's gradient half: the EMA schedule, max-norm rescaling, the preset against a step-by-step reference, state."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.base import Combination
from taskbalance.gradient_balancing.dbmtl import DBMTL
from tests.models import TinyMTL, make_data, task_losses

F64 = torch.float64


def _method(k: int, **options: Any) -> DBMTL:
    method = DBMTL(**options)
    method.setup(k)
    return method


def _jacobian(seed: int, k: int, p: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _direction(method: DBMTL, jac: torch.Tensor) -> torch.Tensor:
    combination: Combination = method(jac, torch.ones(jac.shape[0], dtype=jac.dtype))
    assert combination.direction is not None and combination.weights is None and combination.converged
    return combination.direction


def test_hand_computed_two_steps() -> None:
    method = _method(2)
    first = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=F64)
    # ĝ = 0.1·g: norms 0.3, 0.1 → α = (0.3/(0.3 + 1e-8), 0.3/(0.1 + 1e-8))
    alpha = torch.tensor([0.3 / (0.3 + 1e-8), 0.3 / (0.1 + 1e-8)], dtype=F64)
    torch.testing.assert_close(_direction(method, first), alpha @ (0.1 * first))
    second = torch.tensor([[1.0, 1.0], [0.0, -1.0]], dtype=F64)
    ema = 0.9 * 0.1 * first + 0.1 * second
    norms = ema.norm(dim=1)
    torch.testing.assert_close(_direction(method, second), (norms.max() / (norms + 1e-8)) @ ema)


@given(st.integers(0, 2**31), st.integers(1, 5), st.floats(0.0, 0.99), st.floats(0.0, 2.0))
def test_ema_schedule_and_max_norm_rescaling(seed: int, k: int, beta: float, beta_sigma: float) -> None:
    method = _method(k, beta=beta, beta_sigma=beta_sigma)
    ema = torch.zeros(k, 7, dtype=F64)
    for t in range(1, 5):
        jac = _jacobian(seed + t, k, 7)
        beta_t = beta / t**beta_sigma
        ema = beta_t * ema + (1 - beta_t) * jac
        direction = _direction(method, jac)
        torch.testing.assert_close(method.state_dict()["_extra_state"]["ema"], ema)
        norms = ema.norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        torch.testing.assert_close(direction, alpha @ ema)
        # every rescaled EMA gradient has the largest norm (up to the 1e-8 guard)
        torch.testing.assert_close((alpha[:, None] * ema).norm(dim=1), norms.max().expand(k), rtol=1e-6, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9])
def test_the_engine_buffer_is_neither_kept_nor_written(beta: float) -> None:
    # the engine passes the same J buffer every step and overwrites it in between (GradientBalancer.forward)
    method, buffer = _method(3, beta=beta), torch.empty(3, 5, dtype=F64)
    ema = torch.zeros(3, 5, dtype=F64)
    for t in range(3):
        jac = _jacobian(10 + t, 3, 5)
        buffer.copy_(jac)
        direction = _direction(method, buffer)
        assert torch.equal(buffer, jac)
        ema = beta * ema + (1 - beta) * jac
        buffer.fill_(float("nan"))  # the next step's gradients are being written
        norms = ema.norm(dim=1)
        torch.testing.assert_close(direction, (norms.max() / (norms + 1e-8)) @ ema)
    torch.testing.assert_close(method.state_dict()["_extra_state"]["ema"], ema)


@given(st.integers(0, 2**31), st.integers(2, 5))
def test_task_permutation_equivariance(seed: int, k: int) -> None:
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    a, b = _method(k), _method(k)
    for t in range(3):
        jac = _jacobian(seed + t, k, 6)
        torch.testing.assert_close(_direction(b, jac[perm]), _direction(a, jac))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8))
def test_sum_convention(seed: int, k: int, p: int) -> None:
    g = _jacobian(seed, 1, p)[0]
    jac = g.repeat(k, 1)
    torch.testing.assert_close(_direction(_method(k, beta=0.0), jac), k * g)
    # with the default β = 0.9 the un-corrected EMA reaches K·g geometrically: K·(1 − 0.9ᵗ)·g
    method = _method(k)
    for t in range(1, 4):
        torch.testing.assert_close(_direction(method, jac), k * (1 - 0.9**t) * g)


def test_degenerate_inputs() -> None:
    g = _jacobian(0, 1, 6)[0]
    cases = [
        torch.zeros(3, 6, dtype=F64),
        torch.stack([g, torch.zeros(6, dtype=F64), -g]),
        torch.stack([1e6 * g, g]),
        g[None],
        _jacobian(1, 40, 30),
        _jacobian(2, 3, 6, torch.float32),
    ]
    for jac in cases:
        direction = _direction(_method(jac.shape[0]), jac)
        assert direction.dtype == jac.dtype and torch.isfinite(direction).all()
    # the 1e6-times longer gradient no longer dominates: both rescaled to its norm
    jac = torch.stack([1e6 * g, g])
    torch.testing.assert_close(_direction(_method(2), jac), 0.1 * 1e6 * g * 2, rtol=1e-6, atol=0)
    method = _method(2)
    _direction(method, jac)
    with pytest.raises(ValueError, match="shared parameters changed"):
        method(torch.zeros(2, 7, dtype=F64), torch.ones(2, dtype=F64))


def test_bad_options() -> None:
    for beta in (-0.1, 1.0):
        with pytest.raises(ValueError, match="beta must"):
            DBMTL(beta=beta)
    with pytest.raises(ValueError, match="beta_sigma"):
        DBMTL(beta_sigma=-1.0)


def test_state_round_trip_and_reset() -> None:
    method = _method(3, beta_sigma=0.5)
    for seed in range(3):
        _direction(method, _jacobian(seed, 3, 5))
    fresh = _method(3, beta_sigma=0.5)
    fresh.load_state_dict(method.state_dict())
    for seed in range(3, 5):
        jac = _jacobian(seed, 3, 5)
        assert torch.equal(_direction(method, jac), _direction(fresh, jac))
    method.reset()
    state = method.state_dict()["_extra_state"]
    assert state["ema"] is None and state["step"] == 0


def _reference_step(model: TinyMTL, x: torch.Tensor, y: torch.Tensor, ema: torch.Tensor, lr: float) -> torch.Tensor:
    """One SGD step of METHODS.md's DB-MTL written out: log losses, EMA of their shared gradients (β = 0.9,
    β_σ = 0), α_k = max‖ĝ‖/(‖ĝ_k‖ + 1e-8), shared update Σ α_k ĝ_k, heads ∇Σ log L_k. Returns the new EMA."""
    _, losses = task_losses(model, x, y)
    log_losses = torch.log(losses)
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    jac = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in log_losses
        ]
    )
    ema = 0.9 * ema + 0.1 * jac
    norms = ema.norm(dim=1)
    update = (norms.max() / (norms + 1e-8)) @ ema
    head_grads = torch.autograd.grad(log_losses.sum(), heads)
    with torch.no_grad():
        for p, piece in zip(shared, torch.split(update, [p.numel() for p in shared]), strict=True):
            p.sub_(lr * piece.view_as(p))
        for p, g in zip(heads, head_grads, strict=True):
            p.sub_(lr * g)
    return ema


def test_preset_matches_the_step_by_step_reference() -> None:
    model, reference = TinyMTL(), TinyMTL()
    x, y = make_data()
    balancer = tb.make("dbmtl", n_tasks=3, engine="loop")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    n_shared = sum(p.numel() for p in reference.encoder.parameters())
    ema = torch.zeros(3, n_shared)
    for _ in range(6):
        _, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters())
        optimizer.step()
        optimizer.zero_grad()
        ema = _reference_step(reference, x, y, ema, 0.05)
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
