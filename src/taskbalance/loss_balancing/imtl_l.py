"""IMTL-L: the loss-balance half of Impartial Multi-Task Learning, learnable scales e^{s_k}.

∂ℓ̃_k/∂s_k = e^{s_k} L_k − 1, so at the optimum of s every scaled loss e^{s_k} L_k equals 1: all tasks are kept at
the same loss scale whatever their units, without the distribution assumption behind UW.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Balanced, LossBalancer, task_parameter


class IMTLL(LossBalancer):
    """ℓ̃_k = e^{s_k} L_k − s_k with learnable s_k.

    Paper: Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning" (ICLR 2021,
    OpenReview IMPnRXEWpvr; no arXiv version).

    Args:
        init: initial value of every s_k, default 0 (scales 1), as the paper and LibMTL.
        n_tasks: create the parameters now (for use without a Balancer); otherwise the Balancer does it.

    Reported weights: e^{s_k}, the multiplier of L_k. The s_k are ``nn.Parameter``s trained by the model's
    optimizer: put ``balancer.parameters()`` in it and call ``balancer.to(device)`` before building it.

    Differences: the paper's hybrid IMTL applies these scaled losses to the heads and IMTL-G to the shared
    parameters; here IMTL-L is the loss level alone (compose ``imtl_l+imtl_g`` for the hybrid).
    """

    options = ("init",)

    def __init__(self, init: float = 0.0, n_tasks: int | None = None) -> None:
        super().__init__()
        if not math.isfinite(init):
            raise ValueError(f"init must be finite, got {init}")
        self.init = float(init)
        self.log_scale = nn.Parameter(torch.zeros(0))
        if n_tasks is not None:
            self.setup(n_tasks)

    def reset(self) -> None:
        super().reset()
        self.log_scale = task_parameter(self.log_scale, self.n_tasks, self.init)

    def balance(self, losses: Tensor) -> Balanced:
        if self.log_scale.device != losses.device:
            raise ValueError(
                f"IMTL-L's scales are on {self.log_scale.device} but the losses on {losses.device}: "
                "call balancer.to(device) before building the optimizer"
            )
        scale = torch.exp(self.log_scale)
        return Balanced(losses=scale * losses - self.log_scale, weights=scale.detach().to(losses.dtype))
