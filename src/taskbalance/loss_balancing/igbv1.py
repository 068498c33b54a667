"""IGBv1: improvable gap balancing, heuristic version.

A task's improvable gap is how far it still is from its desired final loss. Taking that loss as 0, the current
loss divided by the task's own early-training loss measures it on a common scale; tasks with a larger remaining
gap get larger weights. The log keeps the loss scales out of the gradient (as in SI).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..method import fields
from .base import Balanced, LossBalancer, log_losses
from .baseline import EpochMeanBaseline


class IGBv1(LossBalancer):
    """ℓ̃_k = w_k · log L_k with w = K · softmax(L / L̄) once the baseline L̄ exists, w = 1 before.

    L̄_k is task k's mean raw training loss over epoch ``base_epoch`` (0-based), recorded at the end of that
    epoch and never updated (:class:`~taskbalance.loss_balancing.baseline.EpochMeanBaseline`). The weights use
    the detached losses of the current batch, carry no gradient, and sum to K.

    Paper: Dai, Fei, Lu, "Improvable Gap Balancing for Multi-Task Learning" (UAI 2023, arXiv 2307.15429).

    Args:
        base_epoch: the epoch whose mean loss is the baseline; default 1 (the second epoch), as the reference.
            Epochs 0..base_epoch run with w = 1, i.e. the scale-invariant method.

    Call :meth:`end_epoch` once per training epoch (``Balancer.end_epoch``). Both L and L̄ scale together when a
    task's loss is multiplied by a constant, so the weights and the update are invariant to loss scaling.

    Differences: none in the algorithm (no temperature, as the reference). The reference averages the batch
    losses on the host with ``.item()``; we average on the losses' device.
    """

    takes_log = True
    options = ("base_epoch",)
    state = fields("_baseline")

    def __init__(self, base_epoch: int = 1) -> None:
        super().__init__()
        if not isinstance(base_epoch, int) or isinstance(base_epoch, bool) or base_epoch < 0:
            raise ValueError(f"base_epoch must be an int >= 0, got {base_epoch!r}")
        self.base_epoch = base_epoch
        self._baseline = EpochMeanBaseline(base_epoch)

    def reset(self) -> None:
        super().reset()
        self._baseline.reset()

    def balance(self, losses: Tensor) -> Balanced:
        raw = losses.detach()
        self._baseline.observe(raw)
        if self._baseline.ready:
            weights = self.n_tasks * torch.softmax(self._baseline.normalised(raw), dim=0)
        else:
            weights = torch.ones_like(raw)
        return Balanced(losses=weights * log_losses(losses), weights=weights)

    def end_epoch(self) -> None:
        self._baseline.end_epoch()
