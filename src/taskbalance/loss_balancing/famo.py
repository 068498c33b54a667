"""FAMO: fast adaptive multitask optimisation, task weights learned from the observed loss decreases.

FAMO wants every task's log loss to fall at the same rate. It keeps task logits ξ (weights z = softmax(ξ)) and,
after each optimizer step, moves them by gradient descent on zᵀδ, where δ_k is the decrease of task k's log loss
on the same batch: tasks that improved more lose weight. One extra forward pass per step, no per-task gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..method import fields
from .base import Balanced, LossBalancer

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


class FAMO(LossBalancer):
    """ℓ̃_k = (z_k / c) · log D_k with D_k = L_k − L*_k + ε, z = softmax(ξ), c = Σ_j z_j / D_j (c detached).

    The update is Σ_k z_k / (c D_k) · ∇L_k, a convex combination of the task gradients (the multipliers sum to
    1). Reported weights: z_k / c, the multiplier of log D_k.

    Logit update, in :meth:`after_step` with the same batch's losses L' under the updated model:
        δ_k = log D_k − log D'_k  (the decrease of the log loss: log(D_k / D'_k), defined for every D > 0,
              including D < 1, and independent of the tasks' loss scales when L* = 0 and ε = 0)
        ξ ← Adam step on the gradient J_softmax(ξ)ᵀ δ = z ⊙ (δ − zᵀδ), with L2 weight decay γ on ξ.

    Paper: Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization" (NeurIPS 2023, arXiv 2306.03792).

    Args:
        w_lr: Adam learning rate of ξ, default 0.025 (the reference). Adam's betas (0.9, 0.999) and ε 1e-8 are
            torch's defaults, as the reference uses.
        gamma: weight decay γ of ξ, default 1e-3 (the paper's Algorithm 2 and LibMTL; in the FAMO repository the
            experiments' FAMO class defaults to 1e-5, its command line and standalone ``famo.py`` to 0.01).
        min_losses: L*_k, the lowest loss each task can reach, default 0. Must be >= 0; a loss at or below its
            floor raises (it would make log D undefined), which costs one device synchronisation per call when
            any floor is non-zero.
        eps: ε, default 1e-8 (the reference).

    Calling :meth:`after_step` (``Balancer.after_step``) after every ``optimizer.step()`` is what makes this FAMO.
    Without it ξ never moves, z stays uniform, and the update is Σ_k (1/D_k) ∇L_k / Σ_j (1/D_j): the scale-invariant
    (log) method with a step scaled by the harmonic mean of the losses. :meth:`after_step` without a preceding
    balanced backward since the last one raises. With gradient accumulation, the last micro-batch's losses are
    the ones compared.

    The balanced losses, and their sum, are negative wherever D_k < 1 (the reference's returned loss too): they
    are a surrogate to differentiate, never a value to monitor, early-stop on or feed an LR scheduler. Use
    ``BalanceResult.losses`` (the raw losses) for that.

    Differences: ξ and its Adam moments are buffers (they round-trip through ``state_dict()`` and are not seen
    by the model's optimizer). The reference clips the shared gradient norm to 1 inside FAMO; that belongs to
    the gradient level here (e.g. a gradient method's ``max_norm``), so FAMO alone does not clip.
    """

    takes_log = True
    options = ("w_lr", "gamma", "min_losses", "eps")
    state = fields(_steps=0, _previous_log=None)
    _steps: int  # Adam steps of ξ
    _previous_log: Tensor | None  # log D of the last balanced batch, until after_step uses it
    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor

    def __init__(
        self,
        w_lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: Sequence[float] | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        for option, value in (("w_lr", w_lr), ("gamma", gamma), ("eps", eps)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{option} must be a finite number >= 0, got {value}")
        if min_losses is not None and not all(math.isfinite(m) and m >= 0 for m in min_losses):
            raise ValueError(f"min_losses must be finite numbers >= 0, got {list(min_losses)}")
        self.w_lr = float(w_lr)
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.min_losses = None if min_losses is None else [float(m) for m in min_losses]
        self._floor: Tensor | None = None  # min_losses as a tensor on the losses' device, made once
        self.register_buffer("logits", torch.zeros(0))
        self.register_buffer("exp_avg", torch.zeros(0))
        self.register_buffer("exp_avg_sq", torch.zeros(0))

    def setup(self, n_tasks: int) -> None:
        if self.min_losses is not None and len(self.min_losses) != n_tasks:
            raise ValueError(f"got {len(self.min_losses)} min_losses for {n_tasks} tasks")
        super().setup(n_tasks)

    def reset(self) -> None:
        super().reset()
        like = self.logits  # keep the device and dtype the module was moved to
        self.logits = like.new_zeros(self.n_tasks)
        self.exp_avg = like.new_zeros(self.n_tasks)
        self.exp_avg_sq = like.new_zeros(self.n_tasks)

    def _gap(self, losses: Tensor) -> Tensor:
        """D = L − L* + ε, refusing a loss at or below its floor."""
        if self.logits.device != losses.device:
            # the method's own state follows the losses (it is not in the model's optimizer)
            self.to(losses.device)
        if self.min_losses is None:
            gap = losses + self.eps if self.eps else losses
        else:
            floor = self._floor
            if floor is None or floor.device != losses.device or floor.dtype != losses.dtype:
                floor = self._floor = torch.tensor(self.min_losses, dtype=losses.dtype, device=losses.device)
            gap = losses - floor + self.eps
            # synchronises: a loss below its floor must be an error, not a NaN weight (only with floors set)
            if not bool((gap.detach() > 0).all()):
                bad = torch.nonzero(gap.detach() <= 0).flatten().tolist()
                raise ValueError(
                    f"FAMO: task(s) {bad} have losses {losses.detach()[bad].tolist()} at or below their "
                    f"min_losses {[self.min_losses[i] for i in bad]}"
                )
        return gap

    def balance(self, losses: Tensor) -> Balanced:
        gap = self._gap(losses)
        log_gap = torch.log(gap)
        z = torch.softmax(self.logits.to(losses.dtype), dim=0)
        weights = z / (z / gap.detach()).sum()
        self._previous_log = log_gap.detach()
        return Balanced(losses=weights * log_gap, weights=weights)

    def after_step(self, losses: Tensor) -> None:
        if self._previous_log is None:
            raise RuntimeError("FAMO.after_step needs a balanced backward of the same batch since the last call")
        decrease = (self._previous_log - torch.log(self._gap(losses.detach()))).to(self.logits.dtype)
        z = torch.softmax(self.logits, dim=0)
        grad = z * (decrease - (z * decrease).sum()) + self.gamma * self.logits
        # Adam, as torch.optim.Adam (L2 weight decay folded into the gradient above)
        self._steps += 1
        self.exp_avg.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
        self.exp_avg_sq.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
        step_size = self.w_lr / (1 - _BETA1**self._steps)
        denom = self.exp_avg_sq.sqrt() / math.sqrt(1 - _BETA2**self._steps) + _ADAM_EPS
        self.logits.addcdiv_(self.exp_avg, denom, value=-step_size)
        self._previous_log = None

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        if self._previous_log is not None:  # saved from another device: follow ξ, as after_step subtracts them
            self._previous_log = self._previous_log.to(self.logits.device)
