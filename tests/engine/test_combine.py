"""A method's malformed Combination (wrong shapes, no weights from a G-only method) is reported clearly."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch
from torch import Tensor

from taskbalance.engine import Engine
from taskbalance.gradient_balancing.base import Combination, GradientBalancer
from tests.engine.helpers import ExplicitDirection, balanced_losses, setup, shared_and_heads


class BadWeights(GradientBalancer):
    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def __init__(self, result: Combination) -> None:
        super().__init__()
        self.result = result

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        return self.result


@pytest.mark.parametrize("path", ["batched", "gramian"])
def test_malformed_combinations_are_reported(path: str) -> None:
    model, x, y = setup("mlp", 3, torch.float64)
    for result, message in [
        (Combination(weights=torch.ones(2, dtype=torch.float64)), r"weights of shape \(2,\), expected \(3,\)"),
        (Combination(direction=torch.ones(5, dtype=torch.float64)), "reads only G .* returned no weights"),
    ]:
        method = BadWeights(result)
        method.setup(3)
        z, balanced = balanced_losses(model, x, y)
        with pytest.raises(ValueError, match=message):
            Engine(path)(balanced, *shared_and_heads(model), method, z)  # type: ignore[arg-type]
    explicit = ExplicitDirection()
    explicit.setup(3)
    explicit.combine = lambda matrix, losses: Combination(direction=torch.ones(5, dtype=torch.float64))  # type: ignore[method-assign]
    z, balanced = balanced_losses(model, x, y)
    with pytest.raises(ValueError, match=r"direction of shape \(5,\), expected \(\d+,\)"):
        Engine("batched")(balanced, *shared_and_heads(model), explicit, z)
