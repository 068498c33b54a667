"""ConFIG: the conflict-free direction that makes the same angle with every task gradient.

ConFIG solves U d = 1 for the unit gradients U (rows g_k/‖g_k‖) in the least-norm sense, so d has an equal,
positive cosine with every g_k, and gives it the length of the summed projections of the g_k on d. Both steps
only need inner products: d = Jᵀ D⁻¹ C⁺ 1 with C the cosine matrix, so the method runs on the Gramian.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .base import Combination, GradientBalancer


def config_weights(gramian: Tensor) -> Tensor:
    """w (K,) with Jᵀw the ConFIG update, from G alone (see :class:`ConFIG`). Zero gradients get w_k = 0."""
    n = gramian.shape[0]
    eps = torch.finfo(gramian.dtype).eps
    g64 = gramian.to(torch.float64)
    g64 = (g64 + g64.T) / 2
    norms = g64.diagonal().clamp(min=0).sqrt()
    nonzero = norms > 0
    inv_norms = torch.where(nonzero, 1 / torch.where(nonzero, norms, 1.0), 0.0)
    cosines = (g64 * inv_norms[:, None] * inv_norms[None, :]).clamp(-1.0, 1.0)
    cosines = torch.where(torch.eye(n, dtype=torch.bool, device=gramian.device) & nonzero, 1.0, cosines)
    # C⁺ 1 through the eigen-decomposition, dropping eigenvalues below the rank tolerance of G's dtype and the
    # eigenvectors orthogonal to 1 up to rounding: the length rule rescales d, so a d that is zero up to
    # rounding (e.g. 1 ⊥ range C for 1-D gradients of mixed signs) would otherwise become an O(1) random update
    eigenvalues, vectors = torch.linalg.eigh(cosines)
    projected = vectors.sum(dim=0)  # Vᵀ 1
    keep = (eigenvalues > eigenvalues[-1].clamp(min=0) * n * eps) & (projected.abs() > n**1.5 * eps)
    pinv_ones = vectors @ torch.where(keep, projected / torch.where(keep, eigenvalues, 1.0), 0.0)
    direction = inv_norms * pinv_ones  # d = Jᵀ direction
    g_direction = torch.mv(g64, direction)
    sq_length = torch.dot(direction, g_direction)  # ‖d‖²
    summed_projection = g_direction.sum()  # Σ_k g_k · d
    scale = torch.where(sq_length > 0, summed_projection / torch.where(sq_length > 0, sq_length, 1.0), 0.0)
    weights: Tensor = (scale * direction).to(gramian.dtype)
    return weights


class ConFIG(GradientBalancer):
    """Conflict-Free Inverse Gradients: with u_k = g_k/‖g_k‖ and U = [u_1; …; u_K],

        d = U⁺ 1  (least-norm solution of u_kᵀ d = 1 for all k),   û = d/‖d‖,   update = (Σ_k g_k·û) û

    so cos(update, g_k) is the same positive number for every k (when the g_k are linearly independent), and the
    length is the sum of the projections of the task gradients on the direction. For dependent gradients (e.g.
    K > P) U d = 1 holds only in the least-squares sense and the summed projection can be negative, which turns
    the update around, exactly as in the reference. From the Gramian: U⁺ = Uᵀ(UUᵀ)⁺,
    UUᵀ = C the cosine matrix, so d = Jᵀ D⁻¹ C⁺ 1 with D = diag(‖g_k‖), and the update is Jᵀw (``needs =
    "gramian"``).

    Paper: Q. Liu, M. Chu, N. Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025, arXiv:2408.11104.

    Args:
        max_norm: clip the norm of the update (default None).

    Defaults as the reference's ``ConFIGOperator()``: equal direction weights (the 1 in U⁺1) and the projection
    length rule. Sum convention: K equal gradients give K·g.

    Differences from the reference code, and why:
    - The reference solves U d = 1 with ``torch.linalg.lstsq`` on the K × P unit gradients; we use C⁺ = (UUᵀ)⁺
      from an eigen-decomposition in float64 (eigenvalues below λ_max · K · ε of G's dtype are dropped), which needs
      only G. It squares the condition number, so directions with singular values of U below ≈ √ε · σ_max are
      treated as dependent; those directions are at the noise level of a float32 G anyway.
    - For K = 2 the reference switches to a closed form that gives the same direction; we use the general one.
    - Zero gradients get weight 0 (the reference's ``nan_to_num`` on their unit vectors does the same) and an
      all-conflicting set (U⁺1 = 0, e.g. two opposite gradients) gives a zero update instead of NaN.
    - The reference's alternative weight and length models (e.g. tracking the minimum gradient norm, or the
      momentum variant M-ConFIG) are not implemented.
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        return Combination(weights=config_weights(matrix))
