"""IMGrad: imbalance-sensitive gradient descent (Zhou, Liu, Zhao, Gong; IJCAI 2025)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields
from ..solvers import linear_plus_norm, min_norm_point, resolved_norm_sq_tensor
from .base import Combination, GradientBalancer
from .cagrad import RESCALES, conflict_averse_weights, rescale_divisor


class IMGrad(GradientBalancer):
    """CAGrad whose objective weighs alignment against imbalance by s = cos(g₀, g_m), g_m the MGDA direction.

    Zhou, Liu, Zhao, Gong, "Injecting Imbalance Sensitivity for Multi-Task Learning", IJCAI 2025,
    arXiv 2503.08006. With g₀ = (1/K)Σ_k g_k (‖g₀‖ = √mean(G)), g_m the min-norm element of conv{g_k} and
    c = α‖g₀‖:

        w = argmin_{w∈Δ} (1.5 − s)·g_wᵀg₀ + s·c·‖g_w‖,      d = K·(g₀ + (c/‖g_w‖)·g_w) / (1 + α²).

    When the tasks are balanced (g_m ∥ g₀, s = 1) w is CAGrad's for the radius 2c; when MGDA's direction departs
    from the mean (imbalance, s → 0) the alignment term g_wᵀg₀ dominates. s ∈ [0, 1] since g_mᵀg_k ≥ ‖g_m‖² for all k.
    Every term is a function of G (g_wᵀg₀ = wᵀG1/K, ‖g_w‖² = wᵀGw), so ``needs = "gramian"``.

    Defaults (the public code): α = 0.8, rescale = 1 (divide by 1 + α²), the factor K "to match the sum loss"
    (K equal gradients give K·g·(1 + α)/(1 + α²), K·g with rescale = 2; α = 0 gives ∇Σℓ̃ exactly).

    Differences from the reference code, on purpose: it works for any K (the reference hard-codes K = 3), on
    the device and from G alone (the reference copies every gradient to the CPU for MGDA); MGDA's min-norm point
    is exact (:func:`taskbalance.solvers.min_norm_point`) and the objective is solved exactly by our SQP
    (:func:`taskbalance.solvers.linear_plus_norm`, after dividing it by 1.5 − s > 0) instead of SLSQP from the
    uniform start, both warm-started from the previous step; the 1e-8 guards are dropped. When g_m = 0
    (Pareto-stationary) s = 0, as torch's ``cosine_similarity`` gives in the reference; when the solved g_w is
    0 too, d = K·g₀ (divided as ``rescale`` says) with ``converged=False`` and a note. The paper's Nash-MTL
    variant is not public in code and not implemented.

    Args:
        alpha: c = α‖g₀‖ (α ≥ 0).
        rescale: 0 (no division), 1 (1 + α², default) or 2 (1 + α).
        max_norm: optional bound on the norm of the shared update (None: no clipping).
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("alpha", "rescale")
    state = fields(_warm=None, _warm_mgda=None)
    _warm: Tensor | None  # the previous step's solutions (CAGrad's dual, MGDA's), the next solves' starts
    _warm_mgda: Tensor | None

    def __init__(self, alpha: float = 0.8, rescale: int = 1, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if rescale not in RESCALES:
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.alpha = float(alpha)
        self.rescale = rescale

    def imbalance_cosine(self, gramian: Tensor) -> tuple[Tensor, Tensor, bool]:
        """(s = cos(g₀, g_m), the MGDA weights of g_m, whether the min-norm solve converged); float64 G. No read:
        s = 0 where ‖g₀‖ or ‖g_m‖ is not resolved by G (Pareto-stationary), decided on the device."""
        mgda = min_norm_point(gramian, init=self._warm_mgda)
        w_m = mgda.x
        k = gramian.shape[0]
        mean_norm_sq, mean_resolved = resolved_norm_sq_tensor(gramian, torch.full_like(w_m, 1 / k))
        min_norm_sq, min_resolved = resolved_norm_sq_tensor(gramian, w_m)
        inner = (gramian @ w_m).mean()  # g₀ᵀg_m
        product = (mean_norm_sq * min_norm_sq).clamp_min(torch.finfo(gramian.dtype).tiny)
        cosine = torch.where(mean_resolved & min_resolved, (inner / product.sqrt()).clamp(-1, 1), 0.0)
        return cosine, w_m, mgda.converged

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        gramian = matrix.to(torch.float64)
        cosine, w_m, mgda_converged = self.imbalance_cosine(gramian)
        self._warm_mgda = w_m
        radius = self.alpha * gramian.mean().clamp_min(0).sqrt()  # c = α‖g₀‖
        # (1.5 − s)·[g_wᵀg₀ + ρ‖g_w‖] with ρ = s·c/(1.5 − s): the same minimiser
        rho = cosine * radius / (1.5 - cosine)
        result = linear_plus_norm(gramian, gramian.mean(dim=1), rho, init=self._warm)
        self._warm = result.x.to(torch.float64)
        weights, resolved = conflict_averse_weights(
            gramian, radius, self._warm, rescale_divisor(self.rescale, self.alpha)
        )
        converged, note = result.converged and mgda_converged, ""
        stationary = bool((~resolved & (radius > 0)).item())  # one read
        if stationary:
            converged = False
            note = "the solved g_w is 0 (Pareto-stationary gradients): d is not unique; returned K·g₀ (rescaled)"
        elif not converged:
            note = f"IMGrad's objective not solved to tolerance (relative KKT gap {float(result.residual):.1e})"
        return Combination(weights=weights.to(matrix.dtype), converged=converged, note=note)
