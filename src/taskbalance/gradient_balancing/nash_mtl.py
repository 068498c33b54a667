"""Nash-MTL: the Nash bargaining solution among the tasks (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields
from .base import Combination, GradientBalancer

#: the Newton solve stops when max_k |α_k(Gα)_k − 1| is below this
TOLERANCE = 1e-10


def nash_newton(cosines: Tensor, start: Tensor, max_iter: int, tol: float) -> tuple[Tensor, int, Tensor, bool]:
    """β > 0 with Cβ = 1/β, by damped Newton on F(β) = ½βᵀCβ − Σ_k log β_k (float64, on the device).

    F is strictly convex and self-concordant on β > 0, and its stationarity condition is exactly Cβ = 1/β. In
    the variables δ = Δβ/β the Newton system is (BCB + I)δ = 1 − β⊙Cβ (B = diag β), whose matrix is ≥ I. The step
    is damped by 1/(1 + λ) while the Newton decrement λ ≥ 1/4, which keeps β > 0 (|δ_k| ≤ λ) and decreases F;
    below 1/4 full steps converge quadratically (Nesterov & Nemirovski). Residual: max_k |β_k(Cβ)_k − 1|.
    Returns (β, iterations, residual, converged).
    """
    k = cosines.shape[0]
    eye = torch.eye(k, dtype=cosines.dtype, device=cosines.device)
    # the best start on the ray through ``start``: F(tβ) is minimal at t² = K / βᵀCβ (exact for equal gradients)
    beta = start * (k / (start @ cosines @ start).clamp_min(1e-6 * (start @ start))).sqrt()
    excess = beta * (cosines @ beta) - 1
    residual = excess.abs().max()
    # one read from the device per iteration: stopping depends on the data
    solved, bounded = torch.stack([residual <= tol, beta.max() < 1e12]).tolist()
    for iteration in range(max_iter + 1):
        if solved:
            return beta, iteration, residual, True
        # β of a solution is moderate (C has a unit diagonal); growth past 1e12 means F is unbounded below
        if iteration == max_iter or not bounded:
            break
        delta, info = torch.linalg.solve_ex(beta[:, None] * cosines * beta[None, :] + eye, -excess)
        decrement = (-excess @ delta).clamp_min(0).sqrt()
        step = torch.where(decrement < 0.25, torch.ones_like(decrement), 1 / (1 + decrement))
        new_beta = beta * (1 + step * delta)
        new_excess = new_beta * (cosines @ new_beta) - 1
        new_residual = new_excess.abs().max()
        valid, solved, bounded = torch.stack(
            [(info == 0) & torch.isfinite(delta).all(), new_residual <= tol, new_beta.max() < 1e12]
        ).tolist()
        if not valid:  # a singular Newton system: keep the last iterate
            break
        beta, excess, residual = new_beta, new_excess, new_residual
    return beta, max_iter, residual, False


class NashMTL(GradientBalancer):
    """Nash bargaining over the update: d = Jᵀα with α > 0 solving Gα = 1/α, i.e. α_k·g_kᵀd = 1 for every k.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a Bargaining Game",
    ICML 2022, arXiv 2202.01017. d maximises Σ_k log(g_kᵀd) in a ball around 0; its weights solve Gα = 1/α. In
    the cosine matrix C = D⁻¹GD⁻¹ (D = diag ‖g_k‖), α = D⁻¹β with Cβ = 1/β, solved by :func:`nash_newton` from G
    alone (``needs = "gramian"``). Nash-MTL is scale-free: scaling g_k scales α_k inversely and leaves d
    unchanged, and ‖d‖² = αᵀGα = K. So the sum convention does not apply (K equal gradients g give
    d = √K·g/‖g‖), and with the default ``max_norm=1`` the shared update always has norm 1 (K ≥ 2).

    Defaults, as the reference (``methods/weight_methods.py``): ``max_norm=1.0`` (the shared update is clipped to
    norm 1, like its ``clip_grad_norm_``), ``optim_niter=20`` (here: the maximum number of Newton steps; 3–8 are
    typical from a warm start, the previous step's solution, or from β ∝ 1 on the first step, as the reference
    starts from 1).

    Differences from the reference code, on purpose:

    - The reference solves by sequential convex approximations with cvxpy/ECOS, stops when ‖G̃α − 1/α‖ < 1e-3
      for G̃ = G/‖G‖_F or α moved < 1e-6, and silently keeps the previous α when ECOS fails or is missing
      (cvxpy ≥ 1.6 no longer installs it). Its G is divided by ‖G‖_F for conditioning, but its constraint
      multiplies that factor back, so its fixed point is α⊙Gα = 1 for the raw G, as here (checked against the
      reference with cvxpy + ECOS: ‖Jᵀα‖ = √K); our Newton solve reaches max_k|α_k(Gα)_k − 1| ≤ 1e-10 (TOLERANCE).
    - No solution exists when 0 is in the convex hull of the gradients (F is unbounded: some α_k → ∞). For a
      zero gradient (norm below 1e-12 of the longest) that α_k would multiply 0: such tasks get α_k = 0 and the
      others are solved among themselves. Otherwise (Pareto-stationary gradients, e.g. exactly opposite ones) or
      when ``optim_niter`` steps are not enough, the last Newton iterate is returned; the update stays bounded
      because α grows only along J's null space. Either way ``converged=False`` with a note, and the warm start
      is dropped.

    The reference's ``update_weights_every`` (solve every N steps, reuse α in between) is the Balancer's option of
    the same name, which serves every weight-based method and skips G on the reuse steps (one ordinary backward).
    Heads get ∇ℓ̃_k from the Balancer, while the reference's backward of Σ_k α_kℓ_k gives them α_k∇ℓ_k.

    Args:
        max_norm: bound on the norm of the shared update (default 1.0; None disables clipping).
        optim_niter: maximum Newton steps per solve (≥ 1).
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("optim_niter",)
    state = fields(_beta=None)
    _beta: Tensor | None  # the last solution (β of the cosine problem), the next solve's start

    def __init__(self, max_norm: float | None = 1.0, optim_niter: int = 20) -> None:
        super().__init__(max_norm=max_norm)
        if not isinstance(optim_niter, int) or optim_niter < 1:
            raise ValueError(f"optim_niter must be an int >= 1, got {optim_niter!r}")
        self.optim_niter = optim_niter

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        gramian = matrix.to(torch.float64)
        k = gramian.shape[0]
        norms = gramian.diagonal().clamp_min(0).sqrt()
        active = norms > 1e-12 * norms.max()
        # one read from the device: refuse NaN/Inf early, and which tasks have a gradient
        finite, any_active, all_active = torch.stack(
            [torch.isfinite(gramian).all(), active.any(), active.all()]
        ).tolist()
        if not finite:
            raise ValueError("Nash-MTL got a non-finite Gramian (NaN or Inf gradients)")
        alpha = torch.zeros(k, dtype=torch.float64, device=gramian.device)
        if not any_active:
            self._beta = None
            note = "all gradients are zero: Nash-MTL has no solution; returned weights 0"
            return Combination(weights=alpha.to(matrix.dtype), converged=False, note=note)
        # the usual case solves on G as is; only zero gradients need the (synchronising) selection of the others
        index = None if all_active else active.nonzero().squeeze(1)
        kept = norms if index is None else norms[index]
        kept_gramian = gramian if index is None else gramian[index][:, index]
        cosines = kept_gramian / torch.outer(kept, kept)
        start = torch.ones_like(kept)
        if self._beta is not None and self._beta.shape == (k,):
            previous = self._beta.to(kept)
            previous = previous if index is None else previous[index]
            start = torch.where(previous > 0, previous, start)
        beta, _, residual, converged = nash_newton(cosines, start, self.optim_niter, TOLERANCE)
        if index is None:
            alpha, full_beta = beta / kept, beta
            dropped: list[int] = []
        else:
            alpha[index] = beta / kept
            full_beta = torch.zeros(k, dtype=torch.float64, device=gramian.device)
            full_beta[index] = beta
            dropped = (~active).nonzero().squeeze(1).tolist()
        notes = []
        if dropped:
            notes.append(f"zero gradient for task(s) {dropped}: no Nash solution (α_k → ∞ on a zero vector); weights 0")
        if not converged:
            notes.append(
                f"Newton did not reach α⊙Gα = 1 in {self.optim_niter} steps (residual {float(residual):.1e}): "
                "0 is (nearly) in the hull of the gradients; returned the last iterate"
            )
        self._beta = full_beta if converged and not dropped else None
        return Combination(weights=alpha.to(matrix.dtype), converged=converged and not dropped, note="; ".join(notes))
