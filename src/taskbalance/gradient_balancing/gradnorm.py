"""GradNorm: learn task weights so that every task's weighted gradient norm matches its relative training rate.

A task that trains slowly (its loss has fallen less than the others' relative to the start) should get a longer
gradient, a fast one a shorter gradient. GradNorm moves the task weights by gradient steps on an L1 mismatch
between the weighted gradient norms and such targets. It needs only the norms ‖g_k‖ = √G_kk and the losses.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields
from .base import Combination, GradientBalancer


class GradNorm(GradientBalancer):
    """Gradient Normalization: update = Jᵀw with task weights w (start at 1, Σ w_k = K), then, with
    G_k = w_k ‖g_k‖, Ḡ = mean_j G_j, r_k = (ℓ̃_k/ℓ̃_k(0)) / mean_j (ℓ̃_j/ℓ̃_j(0)),

        L_grad = Σ_k |G_k − Ḡ · r_k^α|           (Ḡ · r_k^α held constant)
        ∂L_grad/∂w_k = sign(G_k − Ḡ r_k^α) · ‖g_k‖
        w ← Adam step on ∂L_grad/∂w,  w ← max(w, 0),  w ← K · w / Σ w

    The current step uses the weights before their update (as the paper's Algorithm 1). ℓ̃(0) are the losses of
    the first step. Reads only ‖g_k‖ = √G_kk (``needs = "gramian"``).

    Paper: Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257.

    Args:
        alpha: asymmetry α ≥ 0 (default 1.5, LibMTL's default; the paper tunes α per dataset; 0 equalises the
            weighted norms).
        lr: learning rate of the weights' own Adam (β = (0.9, 0.999), ε = 1e-8; default 0.025, the learning rate
            the Nash-MTL/FAMO code gives loss-weight parameters). Adam makes the step independent of the scale of
            the gradient norms.
        max_norm: clip the norm of the update (default None).

    State (in ``state_dict()``): w, ℓ̃(0), Adam's moments and step count.

    The losses must be positive at the first step (a ratio to ℓ̃(0) is taken; this is checked once). A later loss
    ≤ 0 counts as fully trained (r_k from max(ℓ̃_k, 0)), so a log-loss method in front of GradNorm needs care.

    Differences from the reference code, and why:
    - The paper computes the norms on the last shared layer only, to save a backward pass; we use all shared
      parameters (whatever the engine's G covers), which the Gramian gives at no extra cost and which measures
      the gradients that are actually applied. Narrowing ``shared_params`` is not a substitute: parameters left
      out would get the plain ∇ Σ_k ℓ̃_k instead of Jᵀw.
    - The weights have their own optimiser and are not ``nn.Parameter``s, so the model's optimiser (which may be
      built over ``balancer.parameters()``) never steps them twice. LibMTL instead parametrises them as
      K·softmax(s) updated by the model's optimiser, and takes ℓ̃(0) as the mean loss of the first epoch, starting
      GradNorm only in the second epoch; we start at step one, as the paper.
    - Clamping w at 0 before renormalising is ours: an Adam step could otherwise make a weight negative.
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("alpha", "lr")
    state = fields("weights", "exp_avg", "exp_avg_sq", initial_losses=None, adam_step=0)
    initial_losses: Tensor | None  # ℓ̃(0), the losses of the first step
    adam_step: int

    _BETAS = (0.9, 0.999)
    _EPS = 1e-8

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.weights = torch.ones(self.n_tasks, dtype=torch.float64)
        self.exp_avg = torch.zeros(self.n_tasks, dtype=torch.float64)
        self.exp_avg_sq = torch.zeros(self.n_tasks, dtype=torch.float64)

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        device = matrix.device
        values = losses.detach().to(device=device, dtype=torch.float64)
        if self.initial_losses is None:
            # checked once: the first losses are the reference of every later ratio
            if not bool((values > 0).all()):
                raise ValueError(f"GradNorm needs positive losses at its first step, got {values.tolist()}")
            self.initial_losses = values.clone()
        weights = self.weights.to(device)
        current = weights.to(matrix.dtype)
        norms = matrix.diagonal().to(torch.float64).clamp(min=0).sqrt()
        ratios = values.clamp(min=0) / self.initial_losses.to(device)
        mean_ratio = ratios.mean()
        rates = torch.where(mean_ratio > 0, ratios / torch.where(mean_ratio > 0, mean_ratio, 1.0), 1.0)
        weighted = weights * norms
        targets = weighted.mean() * rates.pow(self.alpha)
        grad = torch.sign(weighted - targets) * norms
        weights = self._adam(grad, weights).clamp(min=0)
        total = weights.sum()
        self.weights = torch.where(total > 0, self.n_tasks * weights / torch.where(total > 0, total, 1.0), 1.0)
        return Combination(weights=current)

    def _adam(self, grad: Tensor, weights: Tensor) -> Tensor:
        beta1, beta2 = self._BETAS
        self.adam_step += 1
        self.exp_avg = beta1 * self.exp_avg.to(grad) + (1 - beta1) * grad
        self.exp_avg_sq = beta2 * self.exp_avg_sq.to(grad) + (1 - beta2) * grad * grad
        corrected1 = 1 - beta1**self.adam_step
        corrected2 = math.sqrt(1 - beta2**self.adam_step)
        return weights - self.lr / corrected1 * self.exp_avg / (self.exp_avg_sq.sqrt() / corrected2 + self._EPS)
