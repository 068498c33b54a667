"""EW: equal (or fixed) weighting, ℓ̃_k = w_k · L_k.

The baseline every paper compares against. With the default w = 1 the update is ∇ Σ_k L_k, what
``sum(losses).backward()`` does. Fixed weights (``weights=[...]``) give the classic hand-tuned linear
scalarisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .base import Balanced, LossBalancer


class Equal(LossBalancer):
    """ℓ̃_k = w_k · L_k with constant weights.

    Args:
        weights: K fixed non-negative weights; default all 1 (EW).
    """

    name: ClassVar[str] = "ew"

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if weights is not None and any(not w >= 0 for w in weights):
            raise ValueError(f"fixed weights must be non-negative and finite, got {list(weights)}")
        self.fixed = None if weights is None else [float(w) for w in weights]

    def setup(self, n_tasks: int) -> None:
        if self.fixed is not None and len(self.fixed) != n_tasks:
            raise ValueError(f"got {len(self.fixed)} fixed weights for {n_tasks} tasks")
        super().setup(n_tasks)

    def balance(self, losses: Tensor) -> Balanced:
        if self.fixed is None:
            weights = torch.ones_like(losses.detach())
        else:
            weights = torch.tensor(self.fixed, dtype=losses.dtype, device=losses.device)
        return Balanced(losses=weights * losses, weights=weights)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.fixed}"
