"""DB-MTL's gradient half: the EMA schedule, max-norm rescaling, the preset against a step-by-step reference.

Task permutation, the sum convention (β = 0 and the EMA's catch-up), degenerate inputs, state and reset:
tests/test_contract.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.gradient_balancing.base import Combination
from taskbalance.gradient_balancing.dbmtl import DBMTL
from tests import reference
from tests.models import TinyMTL, make_data, task_losses

F64 = torch.float64


def _method(k: int, **options: Any) -> DBMTL:
    return reference.set_up(DBMTL(**options), k)


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
        jac = reference.jacobian(seed + t, k, 7)
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
        jac = reference.jacobian(10 + t, 3, 5)
        buffer.copy_(jac)
        direction = _direction(method, buffer)
        assert torch.equal(buffer, jac)
        ema = beta * ema + (1 - beta) * jac
        buffer.fill_(float("nan"))  # the next step's gradients are being written
        norms = ema.norm(dim=1)
        torch.testing.assert_close(direction, (norms.max() / (norms + 1e-8)) @ ema)
    torch.testing.assert_close(method.state_dict()["_extra_state"]["ema"], ema)


def test_one_much_longer_gradient_no_longer_dominates() -> None:
    g = reference.jacobian(0, 1, 6)[0]
    # both rescaled to the norm of the 1e6-times longer one (finite updates on degenerate inputs: test_contract)
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


def _reference_step(model: TinyMTL, x: torch.Tensor, y: torch.Tensor, ema: torch.Tensor, lr: float) -> torch.Tensor:
    """One SGD step of DB-MTL (the dbmtl module's docstring) written out: log losses, EMA of their shared
    gradients (β = 0.9, β_σ = 0), α_k = max‖ĝ‖/(‖ĝ_k‖ + 1e-8), shared update Σ α_k ĝ_k, heads ∇Σ log L_k.
    Returns the new EMA."""
    _, losses = task_losses(model, x, y)
    log_losses = torch.log(losses)
    shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    ema = 0.9 * ema + 0.1 * reference.autograd_jacobian(log_losses, shared)
    norms = ema.norm(dim=1)
    update = (norms.max() / (norms + 1e-8)) @ ema
    reference.descend(shared, update, heads, torch.autograd.grad(log_losses.sum(), heads), lr)
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
