"""GLS: the geometric loss strategy, minimise the geometric mean of the task losses.

∇ (Π_k L_k)^{1/K} = GLS · (1/K) Σ_k ∇L_k / L_k: the direction of the scale-invariant (log) method, with a step
that shrinks as the losses do. A task's loss scale therefore cannot dominate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Balanced, LossBalancer, log_losses


class GLS(LossBalancer):
    """Objective GLS = (Π_k L_k)^{1/K}, returned as ℓ̃_k = (GLS / K) · log L_k with GLS detached.

    Σ_k ℓ̃_k has exactly the gradient of the GLS objective, while each ℓ̃_k is a per-task loss a gradient-level
    method can differentiate separately. Reported weights: GLS / (K · L_k), the multiplier of ∇L_k.

    Paper: Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and Geometric
    Loss Strategy for Multi-Task Learning" (CVPR Workshops 2019, arXiv 1904.08492). No options.

    Differences: GLS is computed as exp(mean_k log L_k), which neither overflows nor underflows for many tasks
    (LibMTL forms the product Π_k L_k directly). LibMTL reports L_k / (K Π_j L_j) as weights, which is not the
    multiplier of ∇L_k; ours is. As in LibMTL and the paper, the update is the objective's own gradient (no
    factor K): with equal losses it is the mean, not the sum, of the task gradients.
    """

    takes_log = True

    def balance(self, losses: Tensor) -> Balanced:
        logs = log_losses(losses)
        geometric_mean = torch.exp(logs.detach().mean())
        coefficient = geometric_mean / self.n_tasks
        weights = coefficient / losses.detach()
        return Balanced(losses=coefficient * logs, weights=weights)
