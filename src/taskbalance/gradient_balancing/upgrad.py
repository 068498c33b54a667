"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields
from ..solvers import lower_bounded_qp
from .base import Combination, GradientBalancer


class UPGrad(GradientBalancer):
    """Each g_k projected onto the dual cone of the rows of J, then summed: d = Σ_k π_J(g_k).

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv 2406.16232 (reference code:
    torchjd). The dual cone {x : Jx ≥ 0} holds the directions that conflict with no task; π_J(g_k) = Jᵀv⁽ᵏ⁾ with
    v⁽ᵏ⁾ = argmin_v vᵀGv s.t. v ≥ e_k (the paper's Prop. 1), so the update is Jᵀw with w = Σ_k v⁽ᵏ⁾ — from G alone
    (``needs = "gramian"``), the K small QPs solved together by :func:`taskbalance.solvers.lower_bounded_qp`.
    Properties: g_jᵀd = (Gw)_j ≥ 0 for every task j (no task is harmed to first order), d = Σ_k g_k when the
    gradients do not conflict, and the weights do not change when G is scaled.

    Differences from torchjd, on purpose:

    - Sum convention: torchjd averages the projections (preference vector 1/K); we sum them (preference 1), so K
      equal gradients give K·g = ∇Σℓ̃. The direction is the same, the norm K times larger.
    - torchjd divides G by its trace, returns the plain mean when that trace is below ``norm_eps`` = 1e-4 (so with
      gradients of norm below ~0.01 it silently stops projecting) and adds ``reg_eps`` = 1e-4 to the diagonal
      before quadprog (which needs a positive definite matrix); that ridge makes the projection inexact by about
      1e-4. Our solver needs neither, so both default to 0: the projection is exact (to a 1e-12 relative ridge).
      ``norm_eps=1e-4, reg_eps=1e-4`` reproduces torchjd's behaviour (after its trace normalisation).
    - The QPs run on the device (torchjd solves them one by one on the CPU with quadprog), warm-started from the
      previous step's solutions (kept in ``state_dict()``): when the set of binding constraints has not changed,
      which is the rule between consecutive steps, they take one active-set iteration (up to K = 12, the
      candidate free sets solved in closed form, one batched solve, answer first).

    Args:
        norm_eps: below this trace(G) the weights are all 1 (torchjd: 1e-4); default 0.
        reg_eps: ridge added to G / trace(G) before the projections (torchjd: 1e-4); default 0.
        max_norm: optional bound on the norm of the shared update (None: no clipping).
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("norm_eps", "reg_eps")
    state = fields(_warm=None)
    _warm: Tensor | None  # the previous step's solution, the next solve's start

    def __init__(self, norm_eps: float = 0.0, reg_eps: float = 0.0, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if not norm_eps >= 0:
            raise ValueError(f"norm_eps must be >= 0, got {norm_eps}")
        if not reg_eps >= 0:
            raise ValueError(f"reg_eps must be >= 0, got {reg_eps}")
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        gramian = matrix.to(torch.float64)
        k = gramian.shape[0]
        eye = torch.eye(k, dtype=torch.float64, device=gramian.device)
        trace = gramian.diagonal().sum()
        # one read from the device for the norm_eps case (torchjd's behaviour), only when it is set
        if self.norm_eps > 0 and not bool(trace > self.norm_eps):
            if not bool(torch.isfinite(gramian).all()):
                raise ValueError("UPGrad got a non-finite Gramian (NaN or Inf gradients)")
            return Combination(weights=torch.ones(k, dtype=matrix.dtype, device=matrix.device))
        # trace = 0 means G = 0: the projections of e_k are then e_k themselves, weights all 1, without a read
        normalized = gramian / trace.clamp_min(torch.finfo(torch.float64).tiny)
        if self.reg_eps > 0:
            normalized = normalized + self.reg_eps * eye
        warm = self._warm if self._warm is not None and self._warm.shape == (k, k) else None
        try:  # the solver's one read also refuses NaN/Inf
            result = lower_bounded_qp(normalized, eye, init=warm)
        except ValueError as error:
            raise ValueError("UPGrad got a non-finite Gramian (NaN or Inf gradients)") from error
        self._warm = result.x
        weights = result.x.sum(dim=0)
        note = "" if result.converged else f"dual-cone projections stopped after {result.iterations} iterations"
        return Combination(weights=weights.to(matrix.dtype), converged=result.converged, note=note)
