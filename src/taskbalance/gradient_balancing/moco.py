"""MoCo: MGDA-style weighting of *tracked* gradients, which corrects the bias of stochastic multi-objective steps.

With mini-batch gradients, the min-norm combination of the current gradients is a biased estimate of the
min-norm combination of the true ones. MoCo keeps a running estimate y_k of every task gradient and moves the
weights λ by one projected gradient step per iteration instead of solving the min-norm problem exactly.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields, spare_for
from ..solvers import project_simplex
from .base import Combination, GradientBalancer

LambdaUpdate = Literal["projection", "softmax"]

# On the CPU the columns of J and y are processed in blocks of about this many elements, so that a block of y is
# updated and read twice while it is in cache (see MoCo._track); elsewhere in one block.
_BLOCK_ELEMENTS = 2**18


class MoCo(GradientBalancer):
    """Multi-objective gradient Correction: at step t = 1, 2, …

        y ← y − β_t (y − J),                β_t = β / t^{β_σ}     (tracked gradients, y starts at 0)
        λ ← Π_Δ(λ − γ_t (y yᵀ + ρ I) λ),    γ_t = γ / t^{γ_σ}     (λ starts at 1/K)
        update = K · yᵀλ

    Π_Δ is the Euclidean projection onto the simplex; the factor K is the sum convention (the authors' NYUv2
    code multiplies by the number of tasks "to match the sum loss"). The update is not Jᵀw for the current J, so
    the method reads J (``needs = "jacobian"``); ``Combination.weights`` reports K·λ, the weights on y.

    Paper: H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan, T. Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, arXiv:2210.12624.

    Args (defaults as LibMTL's ``MoCo_*`` arguments):
        beta: β, step size of the gradient tracking, in (0, 1] (default 0.5).
        beta_sigma: β_σ ≥ 0, decay exponent of β_t (default 0.5).
        gamma: γ > 0, step size of λ (default 0.1).
        gamma_sigma: γ_σ ≥ 0, decay exponent of γ_t (default 0.5).
        rho: ρ ≥ 0, ℓ2 regularisation of λ (default 0).
        lambda_update: ``"projection"`` (default, the paper's Π_Δ) or ``"softmax"`` (LibMTL replaces Π_Δ by a
            softmax of the stepped λ, which keeps every weight positive and changes the dynamics).
        normalize: replace g_k by g_k/‖g_k‖ · ℓ̃_k before tracking, as LibMTL does (from the authors' shared
            code); default False, the paper's algorithm.
        max_norm: clip the norm of the update (default None).

    Losses of very different scales: λ descends ½‖yᵀλ‖², the min-norm objective, which favours small gradients.
    Its minimiser on the simplex puts weight 0 on a task whose gradient's projection on a smaller one exceeds
    that one's squared norm (y_K·y_j ≥ ‖y_j‖², which any positively correlated gradient many times larger
    satisfies), and the step overshoots: (y yᵀλ)_K ≈ ‖y_K‖² λ_K is ~1e12 for a gradient 1e6 times the others, so
    γ_t times it drives λ_K far below 0 and Π_Δ clips it to exactly 0 (with conflicting gradients λ jumps
    between vertices of the simplex instead). With loss scales 1e-6, 1, 1e6 and aligned gradients, every step
    gives K·λ = (3, 0, 0): the dominant-scale task is not trained through the update. This is the method (MGDA
    gives the same vertex), not an error. Neither LibMTL option removes it: ``normalize`` rescales g_k to
    ℓ̃_k, which keeps the loss's scale, and the softmax of a stepped λ_K ≈ −1e12 is exactly 0 (every other
    step in that run). Remedy: give MoCo log losses, ``si+moco`` (∇ log L_k = ∇L_k / L_k has no loss scale; the
    same run keeps every K·λ_k in [0.85, 1.14]).

    State (in ``state_dict()``): y (K × P, created at the first step on J's device; ``state_dict()`` holds a copy
    of it), λ, the step t. One step reads J once and y twice (no temporary of J's size: see ``_track``). Each step
    writes the new y into a spare buffer (the y before last) and swaps, never in place: the step's transaction
    then keeps the old y by reference instead of copying K × P floats per step (``Declared.replaced``).

    Differences from the reference code, and why: LibMTL's softmax and gradient normalisation are options (off by
    default, see above). The sum convention holds only asymptotically: y starts at 0, so the first updates are
    shorter than Σ_k g_k (β_1 = β). Everything stays on J's device; the authors' code projects λ with NumPy.
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"
    options = ("beta", "beta_sigma", "gamma", "gamma_sigma", "rho", "lambda_update", "normalize")
    state = fields("lambd", step=0, tracked=None)
    replaced = ("tracked",)
    step: int
    tracked: Tensor | None  # y (K × P): each step writes the next one into the spare buffer and swaps
    _spare: Tensor | None = None  # the previous y's memory, reused (not state: its values are never read)

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        lambda_update: LambdaUpdate = "projection",
        normalize: bool = False,
        max_norm: float | None = None,
    ) -> None:
        super().__init__(max_norm=max_norm)
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        for label, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not value >= 0:
                raise ValueError(f"{label} must be >= 0, got {value}")
        if lambda_update not in ("projection", "softmax"):
            raise ValueError(f"lambda_update must be 'projection' or 'softmax', got {lambda_update!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)
        self.lambda_update: LambdaUpdate = lambda_update
        self.normalize = bool(normalize)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._spare = None
        self.lambd = torch.full((self.n_tasks,), 1 / max(self.n_tasks, 1), dtype=torch.float64)

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        if self.tracked is not None and self.tracked.shape != matrix.shape:
            raise ValueError(
                f"MoCo tracks gradients of shape {tuple(self.tracked.shape)} but got {tuple(matrix.shape)}: the "
                "shared parameters (or, on the representation path, the batch size) must not change between steps"
            )
        self.step += 1
        beta_t = self.beta / self.step**self.beta_sigma
        gamma_t = self.gamma / self.step**self.gamma_sigma
        lambd = self.lambd.to(device=matrix.device, dtype=matrix.dtype)
        tracked, curvature = self._track(matrix, losses, beta_t, lambd)
        stepped = lambd - gamma_t * (curvature + self.rho * lambd)
        lambd = project_simplex(stepped) if self.lambda_update == "projection" else torch.softmax(stepped, dim=0)
        self.lambd = lambd
        weights = self.n_tasks * lambd
        return Combination(weights=weights, direction=torch.mv(tracked.T, weights))

    def _track(self, jacobian: Tensor, losses: Tensor, beta_t: float, lambd: Tensor) -> tuple[Tensor, Tensor]:
        """y ← y − β_t (y − J) (into the spare buffer, then swapped), and y yᵀ λ, in one pass over J and y.

        The columns go in blocks (:data:`_BLOCK_ELEMENTS` elements on the CPU) so that the block of y just updated
        is still in cache for yᵀλ and y (yᵀλ); y yᵀ itself (K² P multiply-adds) is never formed. The first step
        starts from y = 0, i.e. y = β_1 J, without a zero buffer. With ``normalize``, J's rows are scaled by
        c_k = ℓ̃_k / (‖g_k‖ + 1e-8) on the fly: y ← (1 − β_t) y + β_t c_k g_k, no scaled copy of J.
        """
        k, p = jacobian.shape
        scale: Tensor | None = None
        if self.normalize:
            norms = torch.linalg.vector_norm(jacobian, dim=1)
            scale = (beta_t * losses.to(jacobian.dtype) / (norms + 1e-8))[:, None]
        previous = self.tracked
        if previous is not None and (previous.device != jacobian.device or previous.dtype != jacobian.dtype):
            previous = self.tracked = previous.to(jacobian)
        tracked = spare_for(self._spare, previous, jacobian)
        width = max(1, min(p, _BLOCK_ELEMENTS // max(k, 1))) if jacobian.device.type == "cpu" else max(p, 1)
        projection = jacobian.new_empty(width)  # the block of yᵀλ
        curvature = torch.zeros_like(lambd)
        for start in range(0, p, width):
            stop = min(start + width, p)
            block, target = tracked[:, start:stop], jacobian[:, start:stop]
            if previous is None:  # from y = 0: y = β_1 J (or β_1 c ⊙ J), without a zero buffer
                torch.mul(target, beta_t if scale is None else scale, out=block)
            elif scale is not None:
                torch.mul(previous[:, start:stop], 1 - beta_t, out=block).addcmul_(target, scale)
            else:
                torch.lerp(previous[:, start:stop], target, beta_t, out=block)
            part = projection[: stop - start]
            torch.mv(block.T, lambd, out=part)
            curvature.addmv_(block, part)
        self._spare, self.tracked = previous, tracked
        return tracked, curvature
