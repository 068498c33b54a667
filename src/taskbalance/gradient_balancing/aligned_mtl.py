"""Aligned-MTL: make the task gradients orthogonal and equally long before summing them.

The condition number of the gradient matrix measures how much the tasks dominate or conflict; Aligned-MTL
replaces J by the closest (Procrustes) matrix with condition number 1, scaled to the smallest singular value, and
sums its rows. The transformation is a K × K matrix computed from the eigen-decomposition of G alone.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .base import Combination, GradientBalancer

Scale = Literal["min", "median", "rmse"]


def balance_transformation(gramian: Tensor, scale: Scale = "min") -> Tensor:
    """B (K × K, symmetric) such that the aligned gradients B J have B G B = σ² · (projector onto range G).

    With G = V Λ Vᵀ restricted to the eigenvalues above the rank tolerance λ_max · K · ε (ε of G's dtype),
    B = σ · V Λ^(−1/2) Vᵀ, where σ² is the smallest retained eigenvalue (``"min"``), their lower median
    (``"median"``) or their mean (``"rmse"``). For a zero G, B = I. Computed in float64, returned in G's dtype.
    """
    n = gramian.shape[0]
    eps = torch.finfo(gramian.dtype).eps
    g64 = gramian.to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh((g64 + g64.T) / 2)  # ascending
    tolerance = eigenvalues[-1].clamp(min=0) * n * eps
    keep = eigenvalues > tolerance
    kept = keep.sum()
    inv_sqrt = torch.where(keep, eigenvalues.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    count = kept.clamp(min=1)
    if scale == "min":
        sigma_sq = torch.where(keep, eigenvalues, torch.inf).min()
    elif scale == "median":
        # the kept eigenvalues are the top `kept` of the ascending list; the lower median of those
        sigma_sq = eigenvalues.gather(0, (n - count + (count - 1) // 2).reshape(1)).squeeze(0)
    else:
        sigma_sq = torch.where(keep, eigenvalues, 0.0).sum() / count
    transform = (vectors * inv_sqrt) @ vectors.T * sigma_sq.clamp(min=0).sqrt()
    identity = torch.eye(n, dtype=torch.float64, device=gramian.device)
    return torch.where(kept > 0, transform, identity).to(gramian.dtype)


class AlignedMTL(GradientBalancer):
    """Aligned-MTL: update = Σ_k ĝ_k with Ĵ = B J the aligned gradients, i.e. Jᵀw with w = B 1, where

        G = V Λ Vᵀ,  B = σ V Λ^(−1/2) Vᵀ   ⇒   Ĵ Ĵᵀ = B G B = σ² I   (on the range of G)

    so the aligned gradients are orthogonal with equal norm σ (condition number 1). σ = √λ_min by default.
    Eigenvalues below λ_max · K · ε are dropped (rank-deficient G: their directions get no weight).

    Paper: D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, arXiv:2305.19000.

    Args:
        scale: σ² from the kept eigenvalues: ``"min"`` (default, the paper), ``"median"`` or ``"rmse"`` (mean),
            the reference code's ``scale_mode`` options.
        max_norm: clip the norm of the update (default None).

    Sum convention: K equal gradients give K·g (then G = ‖g‖² 11ᵀ has rank 1 and w = 1), as the reference sums
    the aligned gradients.

    Differences from the reference code, and why:
    - The rank tolerance uses the machine ε of G's dtype; the reference uses torch's default dtype (float32) ε
      even for float64 inputs, which drops meaningful directions there.
    - A zero Gramian (all gradients zero) gives w = 1 (the update is zero anyway) where the reference fails.
    - The eigen-decomposition runs in float64 on G's device (K × K, cheap) for accuracy in float32 training.
    - The paper's "Aligned-MTL-UB" variant aligns the gradients of the shared representation instead of the
      parameters: that is this class used through the engine's representation path, not a separate method.
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("scale",)

    def __init__(self, scale: Scale = "min", max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if scale not in ("min", "median", "rmse"):
            raise ValueError(f"scale must be 'min', 'median' or 'rmse', got {scale!r}")
        self.scale: Scale = scale

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        return Combination(weights=balance_transformation(matrix, self.scale).sum(dim=1))
