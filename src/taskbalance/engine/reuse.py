"""Amortised weights (``Balancer(update_weights_every=N)``): solve on every N-th call, reuse w in between.

The calls in between apply the last w with one backward of Σ_k w_k ℓ̃_k into θ: no per-task gradients, no G,
no solver. What is kept (the number of calls, the last w) is part of the Balancer's ``state_dict()``, so that a
resumed run solves on the same calls as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..gradient_balancing.base import Combination


class WeightReuse:
    """When the method solves, and the weights reused until the next solve."""

    def __init__(self, every: int = 1) -> None:
        if not isinstance(every, int) or isinstance(every, bool):
            raise TypeError(f"update_weights_every must be an int, got {every!r}")
        if every < 1:
            raise ValueError(f"update_weights_every must be >= 1, got {every}")
        self.every = every
        self.calls = 0
        self.weights: Tensor | None = None

    def due(self) -> Tensor | None:
        """Count a call of a balancing method: the weights it reuses, or None when it solves."""
        call = self.calls
        self.calls += 1
        if self.weights is not None and call % self.every != 0:
            return self.weights
        return None

    def keep(self, combination: Combination) -> None:
        """Remember the weights of a solve, when later calls will reuse them."""
        if self.every > 1:
            assert combination.weights is not None  # checked with the method: it is weight-based
            self.weights = combination.weights.detach().clone()

    def reset(self) -> None:
        self.calls = 0
        self.weights = None

    def state(self) -> dict[str, Any]:
        return {"calls": self.calls, "reused_weights": self.weights}

    def load(self, state: Mapping[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
        self.weights = state.get("reused_weights")
