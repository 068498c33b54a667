"""UW: uncertainty weighting with learnable per-task log-variances.

Each task's loss is treated as the negative log-likelihood of a Gaussian with a learned noise variance σ_k²;
minimising over σ_k as well as the model down-weights tasks with large (noisy) losses, and the + s_k / 2 term
stops σ_k from growing without bound.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Balanced, LossBalancer, log_losses, task_parameter


class UW(LossBalancer):
    """ℓ̃_k = f_k / (2 e^{s_k}) + s_k / 2 with learnable s_k = log σ_k², f_k = L_k (or log L_k).

    Paper: Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics" (CVPR 2018, arXiv 1705.07115).

    Args:
        log_losses: apply UW to f_k = log L_k instead of L_k (the IGB paper's "UW+SI"; registry preset ``uw_si``).
        init: initial value of every s_k. Default 0 (weights 1/2), as the Nash-MTL and IGB4MTL reference code.
            LibMTL starts at −0.5 (weights ≈ 0.82); pass ``init=-0.5`` to reproduce it.
        n_tasks: create the parameters now (for use without a Balancer); otherwise the Balancer does it.

    Reported weights: 1/(2 e^{s_k}), the actual multiplier of f_k. (The IGB4MTL reference logs e^{−s_k}, twice
    that.) The s_k are ``nn.Parameter``s: put ``balancer.parameters()`` in the optimizer — the references use a
    separate parameter group with lr 0.025 — and call ``balancer.to(device)`` before building it.

    Differences: the paper uses 1/σ² (not 1/(2σ²)) for classification losses; like every public reference we use
    the regression form for all tasks, which only rescales that task's σ.
    """

    options = ("log_losses", "init")

    def __init__(self, log_losses: bool = False, init: float = 0.0, n_tasks: int | None = None) -> None:
        super().__init__()
        if not math.isfinite(init):
            raise ValueError(f"init must be finite, got {init}")
        self.log_losses = bool(log_losses)
        self.takes_log = self.log_losses
        self.init = float(init)
        self.log_var = nn.Parameter(torch.zeros(0))
        if n_tasks is not None:
            self.setup(n_tasks)

    def reset(self) -> None:
        super().reset()
        self.log_var = task_parameter(self.log_var, self.n_tasks, self.init)

    def balance(self, losses: Tensor) -> Balanced:
        if self.log_var.device != losses.device:
            raise ValueError(
                f"UW's log-variances are on {self.log_var.device} but the losses on {losses.device}: "
                "call balancer.to(device) before building the optimizer"
            )
        values = log_losses(losses) if self.log_losses else losses
        precision = 0.5 * torch.exp(-self.log_var)
        balanced = precision * values + 0.5 * self.log_var
        return Balanced(losses=balanced, weights=precision.detach().to(losses.dtype))
