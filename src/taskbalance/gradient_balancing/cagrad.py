"""CAGrad: conflict-averse gradient descent (Liu, Liu, Jin, Stone, Liu; NeurIPS 2021)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields
from ..solvers import linear_plus_norm, resolved_norm_sq_tensor
from .base import Combination, GradientBalancer

RESCALES = (0, 1, 2)


def rescale_divisor(rescale: int, c: float) -> float:
    """CAGrad's final division: 1 (rescale=0), 1 + c² (1, the default) or 1 + c (2)."""
    return (1.0, 1.0 + c * c, 1.0 + c)[rescale]


def conflict_averse_weights(gramian: Tensor, radius: Tensor, w: Tensor, divisor: float) -> tuple[Tensor, Tensor]:
    """Weights of d = K·(g₀ + (radius/‖g_w‖)·g_w)/divisor, i.e. (1 + K·radius·w/‖g_w‖)/divisor, and whether ‖g_w‖
    is resolved by G (a 0-dim bool tensor: no read here). Where it is not (g_w ≈ 0: the gradients are
    Pareto-stationary) d = K·g₀/divisor. float64.
    """
    k = gramian.shape[0]
    norm_sq, resolved = resolved_norm_sq_tensor(gramian, w)
    factor = torch.where(resolved, radius / norm_sq.clamp_min(torch.finfo(norm_sq.dtype).tiny).sqrt(), 0.0)
    return (1 + k * factor * w) / divisor, resolved


class CAGrad(GradientBalancer):
    """Conflict-averse gradient: d = K·(g₀ + (c‖g₀‖/‖g_w‖)·g_w) / (1 + c²), g₀ = (1/K)Σ_k g_k, g_w = Σ_k w_k g_k.

    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
    arXiv 2110.14048. d maximises the worst task improvement min_k g_kᵀd within the ball ‖d − g₀‖ ≤ c‖g₀‖; its
    dual is w = argmin_{w∈Δ} g_wᵀg₀ + c‖g₀‖‖g_w‖, a function of G alone (g_wᵀg₀ = wᵀG1/K, ‖g_w‖² = wᵀGw), so
    ``needs = "gramian"`` and the update is Jᵀ(1 + K·c‖g₀‖·w/‖g_w‖)/(1 + c²).

    Defaults: c = 0.4 and rescale = 1 (divide by 1 + c²), as in the Nash-MTL repository's CAGrad and the IMGrad
    repository's CAGrad runs; rescale 0 (no division) and 2 (1 + c) are the reference's other options. The
    factor K is the reference's "to match the sum loss" (LibMTL omits it): c = 0 gives exactly ∇Σ_k ℓ̃_k, while K
    equal gradients g give K·g·(1 + c)/(1 + c²) (K·g with rescale=2): CAGrad's own scaling, not a sum.

    Differences from the reference code, on purpose: the dual is solved exactly by our own solver
    (:func:`taskbalance.solvers.linear_plus_norm`, SQP to a 1e-9 relative KKT gap, warm-started from the previous
    step's w; up to K = 12 the stationary point of each candidate support in closed form first) instead of
    SciPy's SLSQP from the uniform start on the CPU; the reference's 1e-8 guards inside the square roots are
    dropped. Where 0 lies in the hull of the gradients and the optimum is g_w = 0 (then d
    is not unique) we return d = K·g₀ (divided as ``rescale`` says) with ``converged=False`` and a note.

    Args:
        c: radius of the ball around g₀, relative to ‖g₀‖ (c ≥ 0; c = 0 is gradient descent on Σℓ̃).
        rescale: 0, 1 or 2 (see above).
        max_norm: optional bound on the norm of the shared update (None: no clipping).
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("c", "rescale")
    state = fields(_warm=None)
    _warm: Tensor | None  # the previous step's solution, the next solve's start

    def __init__(self, c: float = 0.4, rescale: int = 1, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if not c >= 0:
            raise ValueError(f"c must be >= 0, got {c}")
        if rescale not in RESCALES:
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.c = float(c)
        self.rescale = rescale

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        gramian = matrix.to(torch.float64)
        mean_norm = gramian.mean().clamp_min(0).sqrt()  # ‖g₀‖
        radius = self.c * mean_norm
        result = linear_plus_norm(gramian, gramian.mean(dim=1), radius, init=self._warm)
        self._warm = result.x.to(torch.float64)
        weights, resolved = conflict_averse_weights(gramian, radius, self._warm, rescale_divisor(self.rescale, self.c))
        converged, note = result.converged, ""
        stationary = bool((~resolved & (radius > 0)).item())  # one read
        if stationary:
            converged = False
            note = "0 is in the hull of the gradients (Pareto-stationary): d is not unique; returned K·g₀ (rescaled)"
        elif not converged:
            note = f"CAGrad's dual not solved to tolerance (relative KKT gap {float(result.residual):.1e})"
        return Combination(weights=weights.to(matrix.dtype), converged=converged, note=note)
