"""The one finiteness check of a step: what it refuses, what it lets through, and what its message names."""

from __future__ import annotations

import pytest
import torch

from taskbalance.engine.finite import require_finite, row_norms


def test_finite_gradients_pass() -> None:
    jacobian = torch.randn(3, 10)
    require_finite(jacobian @ jacobian.T, [torch.randn(4), None, torch.empty(0)])
    require_finite(row_norms(jacobian))
    require_finite(None, [])


def test_a_nan_row_is_named_and_told_from_an_overflowing_one() -> None:
    jacobian = torch.randn(3, 10)
    jacobian[1, 4] = float("nan")
    jacobian[2] *= 1e20
    with pytest.raises(ValueError) as caught:
        require_finite(jacobian @ jacobian.T, rows_finite=lambda: torch.isfinite(jacobian).all(dim=1))
    message = str(caught.value)
    assert "non-finite (NaN or Inf) for task(s) [1]" in message
    assert "task(s) [2] is finite but too large" in message
    assert "check_finite=False" in message


def test_row_norms_refuse_an_overflowing_row_of_j() -> None:
    jacobian = torch.ones(2, 1000)
    jacobian[0] *= 1e19  # ‖g‖² = 1e41 > float32's max
    with pytest.raises(ValueError, match=r"task\(s\) \[0\] is finite but too large"):
        require_finite(row_norms(jacobian), rows_finite=lambda: torch.isfinite(jacobian).all(dim=1))


def test_other_gradients_are_refused_for_nan_or_inf_only() -> None:
    with pytest.raises(ValueError, match="the gradient of 1 parameter tensor"):
        require_finite(None, [torch.ones(3), torch.tensor([1.0, float("inf")])])
    require_finite(None, [torch.full((1000,), 1e19)])  # a finite update whose norm overflows: applied as it is
