"""IMTL-G: the update with equal projections on every task's unit gradient (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..solvers import RIDGE
from .base import Combination, GradientBalancer


class IMTLG(GradientBalancer):
    """Impartial gradient: d = K·Σ_k α_k g_k with Σ_k α_k = 1 and dᵀu_1 = … = dᵀu_K, u_k = g_k/‖g_k‖.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
    (openreview IMPnRXEWpvr; no arXiv version). Equal projections mean D⁻¹Gα ∝ 1 with D = diag(‖g_k‖), so in
    closed form, with C = D⁻¹GD⁻¹ the matrix of gradient cosines:

        α = (D⁻¹C⁻¹1) / (1ᵀD⁻¹C⁻¹1),      dᵀu_k = K / (1ᵀD⁻¹C⁻¹1) for every k.

    This equals the paper's α_{2:K} = g_1ᵀUᵀ(DUᵀ)⁻¹ (differences of gradients and of unit gradients) but needs only
    G (``needs = "gramian"``) and solves a unit-diagonal system. α is not constrained to be positive, as in the
    paper; when 1ᵀD⁻¹C⁻¹1 < 0 the common projection is negative (a known weakness of the method, kept).

    Differences from the reference code (LibMTL; the Nash-MTL repository), on purpose:

    - Sum convention: the weights are K·α (Σ = K), so K equal gradients give K·g = ∇Σℓ̃; the references use α
      (Σ = 1), an update K times smaller.
    - C is factored as C + δI, δ = 1e-8, and the solution refined twice against C, which removes the bias. For
      singular C (parallel or, with K > P, dependent gradients) this picks the solution sharing the weight
      evenly among the unit gradients (equal α_k‖g_k‖ for parallel ones), and where no nonzero d has equal
      projections (exactly opposite gradients) the limit d → 0 is returned. The references invert DUᵀ (the
      Nash-MTL copy adds 1e-8·I only after an exception).
    - A task with a zero gradient has no unit gradient: it is left out of the equal-projection conditions with
      α_k = 0 (the references divide by zero). With all gradients zero the weights are 1.
    - If 1ᵀD⁻¹C⁻¹1 vanishes (no finite α), the weights fall back to 1 (∇Σℓ̃) with ``converged=False``.

    Args:
        max_norm: optional bound on the norm of the shared update (None: no clipping).
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        if not bool(torch.isfinite(matrix).all()):  # a read from the device: refuse NaN/Inf early
            raise ValueError("IMTL-G got a non-finite Gramian (NaN or Inf gradients)")
        gramian = matrix.to(torch.float64)
        k = gramian.shape[0]
        ones = torch.ones(k, dtype=torch.float64, device=gramian.device)
        norms = gramian.diagonal().clamp_min(0).sqrt()
        # gradients below 1e-12 of the longest have no reliable direction in G
        active = norms > 1e-12 * norms.max()
        if not bool(active.any()):
            return Combination(weights=ones.to(matrix.dtype))
        safe = torch.where(active, norms, ones)
        cosines = gramian / torch.outer(safe, safe)
        mask = torch.outer(active, active)
        cosines = torch.where(mask, cosines, torch.eye(k, dtype=torch.float64, device=gramian.device))
        # C + δI for conditioning, refined twice against C (iterated Tikhonov): no bias, even split of ties
        factors, pivots = torch.linalg.lu_factor(
            cosines + RIDGE * torch.eye(k, dtype=torch.float64, device=gramian.device)
        )
        beta = torch.linalg.lu_solve(factors, pivots, ones[:, None])
        for _ in range(2):
            beta = beta + torch.linalg.lu_solve(factors, pivots, ones[:, None] - cosines @ beta)
        beta = beta[:, 0]
        alpha = torch.where(active, beta / safe, torch.zeros_like(beta))
        total = alpha.sum()
        scale = alpha.abs().sum()
        # a read from the device: the Combination reports, as a bool, whether the weights exist
        if not bool(torch.isfinite(total) & (total.abs() > 1e-12 * scale)):
            note = "no finite equal-projection weights (1ᵀD⁻¹C⁻¹1 = 0); fell back to weights 1"
            return Combination(weights=ones.to(matrix.dtype), converged=False, note=note)
        return Combination(weights=(k * alpha / total).to(matrix.dtype))
