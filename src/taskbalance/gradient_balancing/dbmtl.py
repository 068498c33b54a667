"""DB-MTL's gradient half: EMA task gradients rescaled to the largest norm (Lin et al., arXiv 2308.12029)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields, spare_for
from .base import Combination, GradientBalancer


class DBMTL(GradientBalancer):
    """Gradient-magnitude balancing: d = Σ_k α_k ĝ_k with α_k = max_j ‖ĝ_j‖ / (‖ĝ_k‖ + 1e-8).

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029
    (reference code: LibMTL's ``DB_MTL``). ĝ_k is an exponential moving average of the task gradient, per task,
    from a zero buffer, without bias correction, with t the step counter from 1:

        ĝ_k ← β_t·ĝ_k + (1 − β_t)·g_k,      β_t = β / t^{β_σ}.

    Every rescaled EMA gradient α_kĝ_k has the norm of the largest, so no task's gradient dominates by its
    magnitude; the sum (not a mean) keeps the sum convention in the steady state (K equal constant gradients g
    give K·g once the EMA has converged; at step t it is K·(1 − β^t)·g for β_σ = 0). The update is not Jᵀw for
    the current J, so it is returned as an explicit ``direction`` and ``needs = "jacobian"``; the EMA (K × P,
    same dtype and device as J) and the step counter are the method's state.

    DB-MTL proper is the scale-invariant loss level (ℓ̃_k = log L_k; the reference's log(L_k + 1e-8) is
    ``ScaleInvariant(eps=1e-8)``) composed with this: ``tb.make("dbmtl")``; this class alone is
    ``tb.make("ew+dbmtl")``. Defaults: β = 0.9, β_σ = 0 (LibMTL's). The reference computes the EMA on
    the gradients of the shared parameters, as here.

    Args:
        beta: EMA coefficient β in [0, 1) (0: no averaging).
        beta_sigma: decay exponent β_σ ≥ 0 of β_t.
        max_norm: optional bound on the norm of the shared update (None: no clipping, as the reference).
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"
    options = ("beta", "beta_sigma")
    state = fields(_step=0, _ema=None)
    replaced = ("_ema",)
    _step: int
    _ema: Tensor | None  # ĝ (K × P): each step writes the next one into the spare buffer and swaps
    _spare: Tensor | None = None  # the previous ĝ's memory, reused (not state: its values are never read)

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not beta_sigma >= 0:
            raise ValueError(f"beta_sigma must be >= 0, got {beta_sigma}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)

    def reset(self) -> None:
        super().reset()
        self._spare = None

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        if self._ema is not None and self._ema.shape != matrix.shape:
            raise ValueError(
                f"DB-MTL's gradient EMA has shape {tuple(self._ema.shape)} but the Jacobian has {tuple(matrix.shape)}: "
                "the shared parameters changed; call reset()"
            )
        self._step += 1
        beta_t = self.beta / self._step**self.beta_sigma
        # One pass for the EMA (read J and ĝ, write the new ĝ), one for the norms, one for Σ_k α_k ĝ_k: the norms
        # must all be known before any α_k, and no temporary of J's size is made.
        # ĝ is written into a spare buffer, never in place: the step's transaction then keeps the old ĝ by
        # reference instead of copying K × P floats (Declared.replaced); the spare is the ĝ before last.
        if self._ema is None:  # from the zero buffer: ĝ = (1 − β_1)·g, without writing the zeros first
            self._ema, self._spare = torch.mul(matrix, 1 - beta_t), None
        else:
            if self._ema.device != matrix.device or self._ema.dtype != matrix.dtype:
                self._ema = self._ema.to(device=matrix.device, dtype=matrix.dtype)
            out = spare_for(self._spare, self._ema, matrix)
            self._spare, self._ema = self._ema, torch.lerp(self._ema, matrix, 1 - beta_t, out=out)
        norms = torch.linalg.vector_norm(self._ema, dim=1)
        scales = norms.max() / (norms + 1e-8)
        return Combination(direction=torch.mv(self._ema.T, scales))  # faster than scales @ ĝ at small K
