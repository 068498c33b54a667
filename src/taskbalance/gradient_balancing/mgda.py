"""MGDA: the min-norm element of the convex hull of the task gradients (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields
from ..solvers import min_norm_point
from .base import Combination, GradientBalancer

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GradientBalancer):
    """Multiple-gradient descent: the update is K · Σ_k w_k g_k with w = argmin_{w∈Δ} ‖Σ_k w_k ĝ_k‖².

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, arXiv 1810.04650 (the
    algorithm goes back to Désidéri 2012). The min-norm point d = Σ w_k ĝ_k of conv{ĝ_k} satisfies ĝ_kᵀd ≥ ‖d‖²
    for every k: a common descent direction, zero exactly at Pareto-stationary points.

    ĝ_k = g_k / n_k with the reference's normalisations n_k: ``"none"`` (n = 1, the default in the reference
    code), ``"l2"`` (‖g_k‖; "norm" in Sener's code), ``"loss"`` (ℓ̃_k), ``"loss+"`` (ℓ̃_k‖g_k‖). The loss-based
    ones need positive balanced losses (not log losses) and raise otherwise. Everything comes from G: the
    normalised Gramian is G / (n nᵀ), so ``needs = "gramian"``.

    Differences from the reference code, on purpose:

    - Sum convention: the weights are K·w (Σ = K), as the Nash-MTL repository's copy of MGDA does, so that K
      equal gradients give K·g = ∇Σℓ̃; Sener's code and LibMTL use w itself (Σ = 1), an update K times
      smaller, which is only a learning-rate factor.
    - The weights apply to the raw gradients (``apply_to="raw"``, Sener's code and the Nash-MTL copy: the
      normalisation only chooses w); LibMTL applies them to the normalised gradients, reachable as
      ``apply_to="normalized"`` (weights K·w_k / n_k).
    - The min-norm point is exact for every K (active set, :func:`taskbalance.solvers.min_norm_point`, warm-started
      from the previous step; closed forms per candidate support up to K = 12) instead of Frank–Wolfe stopped
      after 250 iterations or a change below 1e-5.
    - A zero gradient makes 0 the min-norm point: the update is then 0 (the reference divides by zero under
      ``"l2"``). Among several optimal w (duplicate gradients) the most even one is returned.

    MGDA-UB (the paper's upper bound: the same problem on the gradients w.r.t. the shared representation) is this
    class run by the engine's ``"representation"`` path: ``tb.make("mgda", n_tasks=K, engine="representation")``.

    Args:
        normalization: how gradients are normalised before the min-norm problem (see above); default "none".
        apply_to: "raw" (default) or "normalized" gradients receive the weights.
        max_norm: optional bound on the norm of the shared update (None: no clipping, the paper's setting).
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("normalization", "apply_to")
    state = fields(_warm=None)
    _warm: Tensor | None  # the previous step's solution, the next solve's start

    def __init__(
        self,
        normalization: Normalization = "none",
        apply_to: Literal["raw", "normalized"] = "raw",
        max_norm: float | None = None,
    ) -> None:
        super().__init__(max_norm=max_norm)
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(_NORMALIZATIONS)}, got {normalization!r}")
        if apply_to not in ("raw", "normalized"):
            raise ValueError(f"apply_to must be 'raw' or 'normalized', got {apply_to!r}")
        self.normalization: Normalization = normalization
        self.apply_to = apply_to

    def _normalizers(self, gramian: Tensor, losses: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        if self.normalization == "none":
            return torch.ones_like(norms)
        if self.normalization == "l2":
            scales = norms
        else:
            values = losses.detach().to(gramian)
            if not bool((values > 0).all()):
                raise ValueError(
                    f"MGDA normalization {self.normalization!r} divides by the balanced losses, which must be "
                    f"positive; got {values.tolist()} (log losses? use 'none' or 'l2')"
                )
            scales = values if self.normalization == "loss" else values * norms
        # a zero gradient stays zero whatever its normaliser
        return torch.where(scales > 0, scales, torch.ones_like(scales))

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        gramian = matrix.to(torch.float64)
        # "none" divides by 1: skip the operations (a step's solver time is mostly per-operation overhead)
        normalizers = None if self.normalization == "none" else self._normalizers(gramian, losses)
        normalized = gramian if normalizers is None else gramian / torch.outer(normalizers, normalizers)
        result = min_norm_point(normalized, init=self._warm)
        self._warm = result.x
        weights = self.n_tasks * result.x
        if self.apply_to == "normalized" and normalizers is not None:
            weights = weights / normalizers
        note = "" if result.converged else f"min-norm active set stopped after {result.iterations} iterations"
        return Combination(weights=weights.to(matrix.dtype), converged=result.converged, note=note)
