"""GradVac: raise the cosine between task gradients to an adaptive, per-pair target ("gradient vaccine").

A generalisation of PCGrad: where PCGrad only removes negative similarity (target 0), GradVac tracks an
exponential moving average of each pair's observed cosine and pulls every pair up to it. Like PCGrad, the adjusted
gradients stay linear combinations of the original ones, so the method runs on the Gramian.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .._random import new_generator
from ..method import fields
from .base import Combination, GradientBalancer
from .pcgrad import random_orders

EmaUpdate = Literal["always", "on_conflict"]


def vaccinate(
    gramian: Tensor, orders: Tensor, targets: Tensor, beta: float, ema_update: EmaUpdate = "always"
) -> tuple[Tensor, Tensor]:
    """Coefficients C (K × K) of the adjusted gradients g'_i = Σ_j C_ij g_j, and the updated targets φ̂ (K × K).

    Row i starts at e_i and visits the (distinct) tasks ``orders[i]``; with φ = cos(g'_i, g_j) and the target
    t = φ̂_ij, when φ < t it adds a multiple of the original g_j that lifts the cosine to exactly t. Then
    φ̂_ij ← (1−β)φ̂_ij + βφ (for every visited pair, or only for adjusted ones with ``ema_update="on_conflict"``).
    Pairs with a zero gradient (squared norm at the rounding level K·ε·max_k G_kk) are neither adjusted nor
    tracked: their cosine is undefined.
    """
    n = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    coeffs = torch.eye(n, dtype=dtype, device=device)
    targets = targets.to(device=device, dtype=dtype).clone()
    rows = torch.arange(n, device=device)
    orders = orders.to(device)
    sq_norms = gramian.diagonal().clamp(min=0)
    # squared norms at the rounding level of G count as zero (a g'_i projected to nothing has no direction)
    floor = n * torch.finfo(dtype).eps * sq_norms.max()
    # everything that depends only on the visited task j, gathered for all visits at once (visit v: column v);
    # each pair (i, j) is visited once, so its target is read before and written after the loop
    norm_j = sq_norms.sqrt()[orders]
    valid_j = sq_norms[orders] > floor
    pair_targets = targets.gather(1, orders)
    sin_target = (1 - pair_targets * pair_targets).clamp(min=0).sqrt()
    # t·sin φ − φ·sin t = sin(angle(φ) − angle(t)); dividing by sin t gives the multiple of g_j/‖g_j‖·‖g'_i‖
    denominator = norm_j * sin_target
    reachable = denominator > 0
    safe = torch.where(reachable, denominator, 1.0)
    rows_j = gramian[orders]  # (K, visits, K): row v of block i is g_j for the j row i visits at v
    zero, one = torch.zeros((), dtype=dtype, device=device), torch.ones((), dtype=dtype, device=device)
    # the visits' columns as Python lists (indexing a list is free, a tensor slice is an operation per visit)
    columns = zip(
        orders.unbind(1),
        rows_j.unbind(1),
        norm_j.unbind(1),
        valid_j.unbind(1),
        pair_targets.unbind(1),
        sin_target.unbind(1),
        reachable.unbind(1),
        safe.unbind(1),
        strict=True,
    )
    tracked_targets = []
    for j, row_j, norm, valid_pair, target, sin_t, reach, safe_denominator in columns:
        sq_norm_i = ((coeffs @ gramian) * coeffs).sum(dim=1).clamp(min=0)  # ‖g'_i‖²
        norm_i = sq_norm_i.sqrt()
        dots = (coeffs * row_j).sum(dim=1)  # g'_i · g_j
        valid = (sq_norm_i > floor) & valid_pair
        phi = torch.where(valid, dots / torch.where(valid, norm_i * norm, one), zero).clamp(-1.0, 1.0)
        sin_phi = (1 - phi * phi).clamp(min=0).sqrt()
        adjust = valid & (phi < target) & reach
        lift = norm_i * (target * sin_phi - phi * sin_t) / safe_denominator
        coeffs.index_put_((rows, j), torch.where(adjust, lift, zero), accumulate=True)
        tracked = adjust if ema_update == "on_conflict" else valid
        tracked_targets.append(torch.where(tracked, (1 - beta) * target + beta * phi, target))
    new_targets = torch.stack(tracked_targets, dim=1) if tracked_targets else pair_targets
    targets.scatter_(1, orders, new_targets)
    return coeffs, targets


class GradVac(GradientBalancer):
    """Gradient Vaccine: update = Σ_i g'_i with, for every i and the other tasks j in random order,

        φ = cos(g'_i, g_j);  if φ < φ̂_ij:  g'_i ← g'_i + ‖g'_i‖ (φ̂_ij √(1−φ²) − φ √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j
        φ̂_ij ← (1 − β) φ̂_ij + β φ                              (targets start at 0: the first step is PCGrad)

    (g'_i starts at g_i, the g_j are the original gradients; the added multiple makes cos(g'_i, g_j) = φ̂_ij
    exactly). From the Gramian: g'_i = Σ_j C_ij g_j, and the update is Jᵀw with w = 1ᵀC (``needs = "gramian"``).

    Paper: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, arXiv:2010.05874.

    Args:
        beta: EMA rate β of the targets, in (0, 1]. Default 0.01, the paper's value; LibMTL defaults to 0.5.
        ema_update: ``"always"`` (default, the paper's Algorithm 1: every visited pair updates its target) or
            ``"on_conflict"`` (LibMTL: only pairs that were adjusted, so targets can only fall below 0 and GradVac
            stays close to PCGrad).
        seed: seed of the method's own CPU ``torch.Generator`` for the visiting orders. None draws one from
            torch's global RNG once, at construction; :meth:`reset` replays it.
        max_norm: clip the norm of the update (default None).

    State (in ``state_dict()``): the K × K targets φ̂, the generator state.

    Sum convention: K equal gradients give K·g (cosines are 1, never below a target).

    Differences from the reference code, and why:
    - Whole-model granularity only (LibMTL's ``group_type=0``). The per-layer / per-matrix variants need one
      Gramian per parameter block, which the engine does not provide; they are left out rather than emulated.
    - Gradients of zero norm (up to G's rounding) are skipped; the reference's absolute ε = 1e-8 in the cosine
      makes the method depend on the scale of the losses (tiny gradients then look orthogonal).
    - A target of exactly ±1 cannot be reached by a finite step (√(1−φ̂²) = 0); such a pair is left unadjusted
      where the reference divides by 1e-8.
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("beta", "ema_update", "seed")
    state = fields("seed", "_generator", "targets")

    def __init__(
        self,
        beta: float = 0.01,
        ema_update: EmaUpdate = "always",
        seed: int | None = None,
        max_norm: float | None = None,
    ) -> None:
        super().__init__(max_norm=max_norm)
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if ema_update not in ("always", "on_conflict"):
            raise ValueError(f"ema_update must be 'always' or 'on_conflict', got {ema_update!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.beta = float(beta)
        self.ema_update: EmaUpdate = ema_update
        self._generator = new_generator(seed)
        self.seed = self._generator.initial_seed()
        self.targets = torch.zeros(0, 0)

    def reset(self) -> None:
        super().reset()
        self._generator.manual_seed(self.seed)
        self.targets = torch.zeros(self.n_tasks, self.n_tasks)  # moved to G's device and dtype at first use

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        orders = random_orders(self.n_tasks, self._generator)
        coeffs, targets = vaccinate(matrix, orders, self.targets, self.beta, self.ema_update)
        self.targets = targets
        return Combination(weights=coeffs.sum(dim=0))
