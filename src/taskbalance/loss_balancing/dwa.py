"""DWA: dynamic weight average, task weights from the rate at which each epoch-mean loss falls.

A task whose loss fell less over the last epoch (ratio closer to or above 1) gets more weight in the next one.
Only loss ratios enter, so the weights do not depend on the tasks' loss scales.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..method import fields
from .base import Balanced, LossBalancer, log_losses


class DWA(LossBalancer):
    """ℓ̃_k = w_k · f_k, f_k = L_k (or log L_k), with w_k = K · exp(r_k / T) / Σ_j exp(r_j / T).

    r_k = L̄_k(e−1) / L̄_k(e−2), where L̄_k(e) is the mean raw training loss of task k over epoch e. The weights
    are 1 during the first two epochs (no two means yet) and then fixed for the whole epoch.

    Paper: Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention" (CVPR 2019, arXiv 1803.10704).

    Args:
        temperature: T, default 2 (the paper's value); larger T flattens the weights towards 1.
        log_losses: weight f_k = log L_k instead of L_k (the IGB paper's "DWA+SI"; preset ``dwa_si``). The ratios
            r_k always use the raw losses.

    Call :meth:`end_epoch` once per training epoch (``Balancer.end_epoch``). The raw losses of every step are
    averaged on their device; an epoch mean that is not positive raises (ratios of such means mean nothing).

    Differences: the Nash-MTL and IGB4MTL reference code replaces epochs with windows of 25 iterations (and
    starts with a buffer of ones); we follow the paper and the authors' mtan code, as LibMTL does.
    """

    options = ("temperature", "log_losses")
    state = fields(_sum=None, _count=0, _previous=None, _weights=None)
    _sum: Tensor | None  # raw losses summed over this epoch, and how many steps
    _count: int
    _previous: Tensor | None  # mean raw losses of the last closed epoch
    _weights: Tensor | None  # this epoch's weights (None: the first two epochs)

    def __init__(self, temperature: float = 2.0, log_losses: bool = False) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)
        self.log_losses = bool(log_losses)
        self.takes_log = self.log_losses

    def balance(self, losses: Tensor) -> Balanced:
        raw = losses.detach().to(torch.float64)
        self._sum = raw if self._sum is None else self._sum.to(raw.device) + raw
        self._count += 1
        if self._weights is None:
            weights = torch.ones_like(losses.detach())
        else:
            weights = self._weights = self._weights.to(device=losses.device, dtype=losses.dtype)
        values = log_losses(losses) if self.log_losses else losses
        return Balanced(losses=weights * values, weights=weights)

    def end_epoch(self) -> None:
        if self._sum is None:
            raise RuntimeError("DWA.end_epoch: no losses were balanced during this epoch")
        mean = self._sum / self._count
        # one synchronisation per epoch: a ratio of non-positive means is meaningless, say so instead of NaN
        if not bool((mean > 0).all()):
            raise ValueError(f"DWA needs positive epoch-mean losses, got {mean.tolist()}")
        if self._previous is not None:
            ratio = mean / self._previous.to(mean.device)
            self._weights = self.n_tasks * torch.softmax(ratio / self.temperature, dim=0)
        self._previous = mean
        self._sum = None
        self._count = 0
