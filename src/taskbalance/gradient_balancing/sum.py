"""Sum: no gradient balancing, the update is ∇ Σ_k ℓ̃_k.

This is the default gradient level of a :class:`~taskbalance.Balancer`: the loss method alone decides the
balance, and the Balancer runs one ordinary backward of Σ_k ℓ̃_k (no per-task gradients are computed).
Through the Jacobian interface it is w = 1 (the sum convention), which the engine tests use as a reference.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .base import Combination, GradientBalancer


class Sum(GradientBalancer):
    """Update = Σ_k g_k (weights all 1). Defaults: no clipping."""

    needs: ClassVar[Literal["gramian", "jacobian", "nothing"]] = "nothing"

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        return Combination(weights=torch.ones(self.n_tasks, dtype=matrix.dtype, device=matrix.device))
