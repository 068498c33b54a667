"""SI: the scale-invariant loss, ℓ̃_k = log L_k.

∇ log L_k = ∇L_k / L_k, so multiplying a task's loss by any constant c_k > 0 (a change of units, a summed
instead of averaged reduction) leaves the update unchanged. It is the loss half of DB-MTL and the "before the
baseline exists" phase of IGB.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Balanced, LossBalancer, log_losses


class ScaleInvariant(LossBalancer):
    """ℓ̃_k = log(L_k + ε), weights 1.

    Paper: the "SI" baseline of Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022,
    arXiv 2202.01017); the same transform is DB-MTL's loss-scale balancing (Lin et al., arXiv 2308.12029).

    Args:
        eps: ε added inside the log, default 0. The Balancer already refuses L_k <= 0 for this method, so no ε
            is needed and without one the invariance to per-task loss scaling is exact. DB-MTL's reference code
            adds ε = 1e-8; pass ``eps=1e-8`` to reproduce it bit for bit.

    The balanced losses are negative wherever L_k + ε < 1: they are a surrogate to differentiate, not a quantity
    to monitor or to feed an LR scheduler (use ``BalanceResult.losses``, the raw losses).
    """

    takes_log = True
    options = ("eps",)

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        self.eps = float(eps)

    def balance(self, losses: Tensor) -> Balanced:
        shifted = losses + self.eps if self.eps else losses
        return Balanced(losses=log_losses(shifted), weights=torch.ones_like(losses.detach()))
