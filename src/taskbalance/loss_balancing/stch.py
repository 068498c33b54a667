"""STCH: smooth Tchebycheff scalarisation, a soft maximum of the (normalised) task losses.

Minimising max_k w_k (f_k − z_k) (Tchebycheff) can reach every Pareto-optimal trade-off, but it is not smooth
and only the worst task moves at each step. The log-sum-exp with smoothing μ is a smooth upper bound that
gives every task a softmax share of the update, the worst one the largest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..method import fields
from .base import Balanced, LossBalancer, log_losses
from .baseline import EpochMeanBaseline


class STCH(LossBalancer):
    """Objective K · μ · log Σ_k exp(w_k (f_k − z_k) / μ), returned as ℓ̃_k = K · p_k · w_k · f_k.

    f_k = log(L_k / L̄_k) by default, with L̄_k the mean raw loss of the last warm-up epoch; p = softmax(w ⊙
    (f − z) / μ) is detached, so Σ_k ℓ̃_k has exactly the objective's gradient while each ℓ̃_k stays a per-task
    loss a gradient-level method can differentiate. Reported weights: K · p_k · w_k (they sum to K when w = 1).
    During the warm-up epochs ℓ̃_k = log L_k (or L_k when ``log_losses=False``) with weights 1.

    Paper: Lin, Zhang, Yang, Liu, Wang, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization" (ICML 2024, arXiv 2402.19078). Defaults are those of the authors' MTL code (Xi-L/STCH, also
    LibMTL): μ = 1, five warm-up epochs, losses normalised by the last warm-up epoch's mean, logs on, w = 1,
    z = 0, and the factor K (the sum convention).

    Args:
        mu: smoothing μ > 0; μ → 0 approaches the Tchebycheff max, large μ the mean.
        warmup_epochs: epochs trained on the plain sum before STCH starts (the reference's ``STCH_warmup_epoch=4``
            is the 0-based index of the last one). With ``normalise`` it must be >= 1.
        normalise: divide L_k by L̄_k, which makes the method invariant to per-task loss scaling.
        log_losses: f_k takes the log (losses must then be positive).
        preference: w, K positive numbers (default all 1).
        ideal: z, K numbers in the units of f (default all 0: with the defaults, the warm-up level L̄).

    Call :meth:`end_epoch` once per training epoch (``Balancer.end_epoch``).

    Differences: the reference adds 1e-20 inside its logs; the Balancer already refuses L_k <= 0 when logs are
    taken, so we add nothing. The reference subtracts the maximum before exponentiating; the softmax does the same.
    """

    options = ("mu", "warmup_epochs", "normalise", "log_losses", "preference", "ideal")
    state = fields("_baseline", _epoch=0)
    _epoch: int

    def __init__(
        self,
        mu: float = 1.0,
        warmup_epochs: int = 5,
        normalise: bool = True,
        log_losses: bool = True,
        preference: Sequence[float] | None = None,
        ideal: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"mu must be a finite number > 0, got {mu}")
        if not isinstance(warmup_epochs, int) or isinstance(warmup_epochs, bool) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        if normalise and warmup_epochs < 1:
            raise ValueError("normalise=True needs warmup_epochs >= 1 (the last warm-up epoch gives L̄)")
        if preference is not None and not all(math.isfinite(w) and w > 0 for w in preference):
            raise ValueError(f"preference must be finite numbers > 0, got {list(preference)}")
        if ideal is not None and not all(math.isfinite(z) for z in ideal):
            raise ValueError(f"ideal must be finite numbers, got {list(ideal)}")
        self.mu = float(mu)
        self.warmup_epochs = warmup_epochs
        self.normalise = bool(normalise)
        self.log_losses = bool(log_losses)
        self.takes_log = self.log_losses
        self.preference = None if preference is None else [float(w) for w in preference]
        self.ideal = None if ideal is None else [float(z) for z in ideal]
        self._baseline = EpochMeanBaseline(max(warmup_epochs - 1, 0))
        self._cached: tuple[Tensor, Tensor] | None = None

    def setup(self, n_tasks: int) -> None:
        for option, values in (("preference", self.preference), ("ideal", self.ideal)):
            if values is not None and len(values) != n_tasks:
                raise ValueError(f"got {len(values)} {option} values for {n_tasks} tasks")
        super().setup(n_tasks)

    def reset(self) -> None:
        super().reset()
        self._baseline.reset()

    def _vectors(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(w, z) on the device and dtype of ``like``, made once rather than copied from the host every step."""
        cached = self._cached
        if cached is None or cached[0].device != like.device or cached[0].dtype != like.dtype:
            preference = torch.ones_like(like) if self.preference is None else like.new_tensor(self.preference)
            ideal = torch.zeros_like(like) if self.ideal is None else like.new_tensor(self.ideal)
            cached = self._cached = (preference, ideal)
        return cached

    def balance(self, losses: Tensor) -> Balanced:
        raw = losses.detach()
        if self.normalise:
            self._baseline.observe(raw)
        if self._epoch < self.warmup_epochs:
            values = log_losses(losses) if self.log_losses else losses
            return Balanced(losses=values, weights=torch.ones_like(raw))
        # normalised(1) = 1 / L̄, recorded at the end of the last warm-up epoch
        scaled = losses * self._baseline.normalised(torch.ones_like(raw)) if self.normalise else losses
        values = log_losses(scaled) if self.log_losses else scaled
        preference, ideal = self._vectors(raw)
        shares = torch.softmax(preference * (values.detach() - ideal) / self.mu, dim=0)
        weights = self.n_tasks * shares * preference
        return Balanced(losses=weights * values, weights=weights)

    def end_epoch(self) -> None:
        if self.normalise:
            self._baseline.end_epoch()
        self._epoch += 1
