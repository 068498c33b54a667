"""GradDrop: per coordinate, keep one sign with probability given by the sign purity P.

Task permutation (same draws), the sum convention, degenerate inputs, state, reset and the Balancer path:
tests/test_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.gradient_balancing import graddrop
from taskbalance.gradient_balancing.base import Combination
from taskbalance.gradient_balancing.graddrop import GradDrop, sign_dropout
from tests import reference


def _method(k: int, **options: object) -> GradDrop:
    return reference.set_up(GradDrop(**options), k)  # type: ignore[arg-type]


def _step(method: GradDrop, jacobian: torch.Tensor) -> torch.Tensor:
    combination: Combination = method(jacobian, torch.ones(jacobian.shape[0], dtype=jacobian.dtype))
    assert combination.direction is not None and combination.weights is None
    return combination.direction


def test_hand_computed() -> None:
    jacobian = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, -1.0, 0.0, 1.0]])
    # P = (½, 0, ½, 1): coordinate 0 keeps the positive part when U < ½, the negative part otherwise
    uniform = torch.tensor([0.3, 0.6, 0.2, 0.99])
    torch.testing.assert_close(sign_dropout(jacobian, uniform), torch.tensor([1.0, -3.0, 0.0, 4.0]))
    uniform = torch.tensor([0.7, 0.0, 0.9, 0.0])
    torch.testing.assert_close(sign_dropout(jacobian, uniform), torch.tensor([-1.0, -3.0, 0.0, 4.0]))
    # a leak ℓ lets ℓ of every dropped gradient through
    torch.testing.assert_close(sign_dropout(jacobian, uniform, leak=0.5), torch.tensor([-0.5, -3.0, 0.0, 4.0]))
    torch.testing.assert_close(sign_dropout(jacobian, uniform, leak=1.0), jacobian.sum(dim=0))


@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 12))
def test_each_coordinate_is_one_signed_part(seed: int, k: int, p: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(k, p, generator=generator, dtype=torch.float64)
    jacobian[:, : p // 3] = jacobian[:, : p // 3].abs()  # some coordinates where every task agrees
    update = sign_dropout(jacobian, torch.rand(p, generator=generator, dtype=torch.float64))
    positive, negative = jacobian.clamp(min=0).sum(dim=0), jacobian.clamp(max=0).sum(dim=0)
    assert ((update == positive) | (update == negative)).all()
    torch.testing.assert_close(update[: p // 3], jacobian[:, : p // 3].sum(dim=0))


def _dense_sign_dropout(jacobian: torch.Tensor, uniform: torch.Tensor, leak: float) -> torch.Tensor:
    """The formula of :class:`GradDrop` written out with K × P masks, as a reference for the blocked version."""
    total, mass = jacobian.sum(dim=0), jacobian.abs().sum(dim=0)
    purity = 0.5 * (1 + torch.where(mass > 0, total / torch.where(mass > 0, mass, 1.0), 0.0))
    positive = uniform < purity
    keep = (positive & (jacobian > 0)) | (~positive & (jacobian < 0))
    return (jacobian * (leak + (1 - leak) * keep.to(jacobian.dtype))).sum(dim=0)


@given(
    st.integers(0, 2**31),
    st.integers(1, 6),
    st.integers(1, 40),
    st.sampled_from([0.0, 0.3, 1.0]),
    st.integers(1, 50),
)
def test_column_blocks_give_the_dense_formula(seed: int, k: int, p: int, leak: float, block: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(k, p, generator=generator, dtype=torch.float64)
    jacobian[:, ::4] = 0.0  # columns of zeros, where the update must be 0
    uniform = torch.rand(p, generator=generator, dtype=torch.float64)
    original = jacobian.clone()
    with pytest.MonkeyPatch.context() as patch:  # blocks of a few columns, the last one ragged
        patch.setitem(graddrop._BLOCK_ELEMENTS, "cpu", block)
        update = sign_dropout(jacobian, uniform.clone(), leak)
    assert torch.equal(jacobian, original)  # J is the engine's buffer: read, never written
    torch.testing.assert_close(update, _dense_sign_dropout(jacobian, uniform, leak))


def test_scratch_is_not_state() -> None:
    method = _method(3, seed=1)
    _step(method, torch.randn(3, 100, generator=torch.Generator().manual_seed(2)))
    assert method._scratch is not None
    identity = {"method": "GradDrop", "options": {"n_tasks": 3, "max_norm": None, "leak": 0.0}}
    assert method.state_dict()["_extra_state"] == {**identity, "seed": method.seed, "step": 1}


def test_positive_sign_is_chosen_with_probability_p() -> None:
    # one coordinate pattern repeated 40 000 times: g = (3, −1) has P = ½ (1 + 2/4) = ¾
    jacobian = torch.tensor([[3.0], [-1.0]]).expand(2, 40_000).contiguous()
    update = _step(_method(2, seed=0), jacobian)
    assert ((update == 3.0) | (update == -1.0)).all()
    assert abs(float((update == 3.0).double().mean()) - 0.75) < 0.01  # binomial σ ≈ 0.002


def test_single_task_passes_through() -> None:
    g = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_step(_method(1), g), g[0])


def test_draws_depend_on_the_step() -> None:
    jacobian = torch.randn(4, 300, generator=torch.Generator().manual_seed(5))
    method = _method(4, seed=11)
    assert not torch.equal(_step(method, jacobian), _step(method, jacobian))


@pytest.mark.parametrize(
    ("options", "message"), [({"leak": -0.1}, "leak"), ({"leak": 1.5}, "leak"), ({"seed": 2.0}, "seed")]
)
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradDrop(**options)  # type: ignore[arg-type]
