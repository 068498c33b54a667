"""PCGrad: project every task gradient off the task gradients it conflicts with ("gradient surgery").

Each projection only needs inner products, so the whole procedure runs on the Gramian: the projected gradients
stay linear combinations of the original ones, and the update is Jᵀw for a w computed from G.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .._random import new_generator
from ..method import fields
from .base import Combination, GradientBalancer


def random_orders(n_tasks: int, generator: torch.Generator) -> Tensor:
    """(K, K−1) int64 on the CPU: row i is a uniformly random order of the tasks other than i."""
    keys = torch.rand(n_tasks, n_tasks, generator=generator)
    keys.fill_diagonal_(2.0)  # every key is < 1, so task i itself sorts last and is cut off
    return keys.argsort(dim=1)[:, : n_tasks - 1]


def project_conflicting(gramian: Tensor, orders: Tensor) -> Tensor:
    """Coefficients C (K × K) of the projected gradients, g'_i = Σ_j C_ij g_j.

    Row i starts at e_i and visits the tasks ``orders[i]`` in turn; when g'_i · g_j < 0 it removes the component
    of g'_i along the original g_j. Rows are independent, so all K rows advance together, one visit per round.
    A zero gradient g_j is skipped (nothing to project on).
    """
    n = gramian.shape[0]
    coeffs = torch.eye(n, dtype=gramian.dtype, device=gramian.device)
    rows = torch.arange(n, device=gramian.device)
    orders = orders.to(gramian.device)
    # what depends only on the visited task j, gathered for all visits at once (visit v: column v)
    rows_j = gramian[orders]  # (K, visits, K)
    sq_norms = gramian.diagonal()[orders]
    nonzero = sq_norms > 0
    safe = torch.where(nonzero, sq_norms, 1.0)
    for visit in range(orders.shape[1]):
        dots = (coeffs * rows_j[:, visit]).sum(dim=1)  # g'_i · g_j for every row i
        factor = torch.where(nonzero[:, visit], dots.clamp(max=0) / safe[:, visit], 0.0)
        coeffs.index_put_((rows, orders[:, visit]), -factor, accumulate=True)
    return coeffs


class PCGrad(GradientBalancer):
    """Projecting Conflicting Gradients: update = Σ_i g'_i with, for every i and the other tasks j in random order,

        g'_i ← g'_i − min(0, g'_i·g_j) / ‖g_j‖² · g_j      (g'_i starts at g_i; the g_j are the ORIGINAL gradients)

    so that after its last projection g'_i no longer conflicts with that g_j. From the Gramian: g'_i = Σ_j C_ij g_j,
    g'_i·g_j = (C G)_ij, and the update is Jᵀw with w = 1ᵀC (``needs = "gramian"``).

    Paper: T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, arXiv:2001.06782.

    Args:
        seed: seed of the method's own CPU ``torch.Generator`` that draws the orders (a fresh order per task and
            per step). None draws a seed from torch's global RNG once, at construction; :meth:`reset` replays it.
        max_norm: clip the norm of the update (default None: no clipping).

    Sum convention: without conflicts the update is Σ_k g_k (K equal gradients give K·g).

    Differences from the reference code, and why:
    - The paper visits j ≠ i only; the PyTorch ports (LibMTL, Pytorch-PCGrad) shuffle all K tasks, i included,
      which changes g'_i only in the rare case where earlier projections turned it against g_i. We follow the paper.
    - The authors' TensorFlow code shuffles a copy of the losses and discards it, so its order is never random;
      we shuffle as the paper says, from our own generator (state saved) so that resumed runs are bit-identical.
    - A zero g_j is skipped instead of dividing by ‖g_j‖² = 0 (NaN in the reference code).
    - The orders are drawn on the CPU (K(K−1) indices copied to the device per step) so that a seed gives the same
      orders on every device.
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("seed",)
    state = fields("seed", "_generator")

    def __init__(self, seed: int | None = None, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self._generator = new_generator(seed)
        self.seed = self._generator.initial_seed()

    def reset(self) -> None:
        super().reset()
        self._generator.manual_seed(self.seed)

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        orders = random_orders(self.n_tasks, self._generator)
        weights = project_conflicting(matrix, orders).sum(dim=0)
        return Combination(weights=weights)
