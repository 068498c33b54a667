"""What one step's gradients carry besides the balanced losses: a loss scale, and the ranks they are averaged over.

Loss scaling (``Balancer.backward(..., scaler=GradScaler)``). The engine differentiates s·ℓ̃ (s the scaler's
scale, a power of two), so every gradient it computes carries the factor s, as in an fp16 backward that must not
underflow. The method must see the problem of ℓ̃ itself: it is handed J/s, G/s² and ℓ̃ (dividing by a power of
two is exact), its ``max_norm`` applies to the unscaled update, and a direction it returns is multiplied by s
before it is written. What reaches ``.grad`` therefore carries s, which ``scaler.unscale_`` divides out. With
s = 1 (no scaler) nothing is divided or multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .distributed import Ranks


@dataclass(frozen=True)
class StepContext:
    """The loss scale s of the step's gradients (1: none) and the ranks of its process group (None: one process)."""

    scale: float = 1.0
    ranks: Ranks | None = None

    @property
    def exact_ranks(self) -> Ranks | None:
        """The ranks whose per-task gradients are averaged before the method (mode ``"exact"``)."""
        return self.ranks if self.ranks is not None and self.ranks.exact else None

    @property
    def local_ranks(self) -> Ranks | None:
        """The ranks whose updates are averaged after the method (mode ``"local"``)."""
        return self.ranks if self.ranks is not None and not self.ranks.exact else None

    def agree(self, finite: bool) -> bool:
        """Whether every rank's gradients are finite, from this rank's verdict: agreed over ``"local"`` ranks
        (which check their own gradients), taken as it is otherwise (one process, or the reduced gradients)."""
        ranks = self.local_ranks
        return finite if ranks is None else ranks.all_true(finite)

    def unscaled(self, tensor: Tensor, power: int = 1) -> Tensor:
        """``tensor`` / s**power: J (power 1), G (power 2) or ℓ̃ as the method must see them."""
        return tensor if self.scale == 1.0 else tensor / self.scale**power

    def scaled(self, tensor: Tensor) -> Tensor:
        """``tensor`` · s: a direction the method returned, as the gradients written beside it carry s."""
        return tensor if self.scale == 1.0 else tensor * self.scale

    def max_norm(self, max_norm: float | None) -> float | None:
        """The clipping threshold for an update that carries s."""
        return max_norm if max_norm is None or self.scale == 1.0 else max_norm * self.scale
