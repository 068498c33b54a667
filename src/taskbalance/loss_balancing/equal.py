"""EW: equal (or fixed) weighting, ℓ̃_k = w_k · L_k.

The baseline every paper compares against. With the default w = 1 the update is ∇ Σ_k L_k, what
``sum(losses).backward()`` does. Fixed weights (``weights=[...]``) give the classic hand-tuned linear
scalarisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Balanced, LossBalancer


class Equal(LossBalancer):
    """ℓ̃_k = w_k · L_k with constant weights.

    Args:
        weights: K fixed non-negative weights; default all 1 (EW).
    """

    options = ("weights",)

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if weights is not None and any(not w >= 0 for w in weights):
            raise ValueError(f"fixed weights must be non-negative and finite, got {list(weights)}")
        self.weights = None if weights is None else [float(w) for w in weights]

    def setup(self, n_tasks: int) -> None:
        if self.weights is not None and len(self.weights) != n_tasks:
            raise ValueError(f"got {len(self.weights)} fixed weights for {n_tasks} tasks")
        super().setup(n_tasks)

    def balance(self, losses: Tensor) -> Balanced:
        if self.weights is None:
            weights = torch.ones_like(losses.detach())
        else:
            weights = torch.tensor(self.weights, dtype=losses.dtype, device=losses.device)
        return Balanced(losses=weights * losses, weights=weights)
