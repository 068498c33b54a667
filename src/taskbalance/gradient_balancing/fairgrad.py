"""FairGrad: task weights from α-fair resource allocation, solving G w = w^(−1/α) by a damped Newton method.

The update d = Jᵀw gives task k the "utility" g_k·d = (G w)_k; FairGrad asks for the α-fair allocation, whose
optimality condition is (G w)_k = w_k^(−1/α). That condition is exactly the stationarity condition of the strictly
convex function F(w) = ½ wᵀGw − Σ_k φ_α(w_k) on w > 0, with φ_α' (w) = w^(−1/α), so a damped Newton method that
keeps w > 0 solves it exactly and needs only G.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import fields
from .base import Combination, GradientBalancer

#: step sizes tried by the backtracking line search, as fractions of the largest step that keeps v > 0
_STEPS = 0.5 ** torch.arange(40, dtype=torch.float64)


def _utility(v: Tensor, alpha: float) -> Tensor:
    """φ_α(v) elementwise along the last axis: log v for α = 1, v^(1−1/α)/(1−1/α) otherwise."""
    if alpha == 1.0:
        return torch.log(v)
    power = 1 - 1 / alpha
    return v.pow(power) / power


def solve_fair_weights(
    gramian: Tensor, alpha: float = 1.0, tol: float = 1e-6, max_iter: int = 100, init: Tensor | None = None
) -> tuple[Tensor, Tensor | None, bool, str]:
    """(w, v, converged, note): w > 0 with G w = w^(−1/α) up to a relative residual ``tol`` per task, and the
    solution v in the scaled variables below (None unless converged), which ``init`` takes back as a warm start.

    Tasks with a zero gradient get w_k = 0 (they have no utility to allocate). The solve runs in float64 in the
    variables v_k = ‖w_k g_k‖ / (κ s) (s = max_k ‖g_k‖, κ = s^(−2α/(1+α))), where the problem reads
    C v = b ⊙ v^(−1/α) with C the cosine matrix and b_k = (‖g_k‖/s)^(1/α−1): Newton's method is affine invariant,
    so this only improves conditioning, and solutions are O(1) whatever the scale of the gradients. When no
    solution exists (0 in the convex hull of some of the gradients, e.g. two opposite ones) the iterates run off
    to infinity; past v = 10^(12α/(1+α)) (what two gradients ≈ 1.4·10⁻⁶ rad from opposite need, since
    v^(1+1/α)(1 − cos ε) = 1: below the resolution of a float32 Gramian) the solve stops and returns w = 0 with
    converged False. When the line search stalls or
    ``max_iter`` iterations do not reach ``tol``, the last iterate comes with converged False.
    """
    n = gramian.shape[0]
    device = gramian.device
    g64 = gramian.to(torch.float64)
    g64 = (g64 + g64.T) / 2
    norms = g64.diagonal().clamp(min=0).sqrt()
    active = norms > 0
    top = norms.max()
    top = torch.where(top > 0, top, 1.0)
    rel = torch.where(active, norms / top, 1.0)
    # cosine matrix on active tasks; an inactive task becomes the decoupled equation v_k = v_k^(−1/α), v_k = 1
    identity = torch.eye(n, dtype=torch.float64, device=device)
    both = active[:, None] & active[None, :]
    cosines = torch.where(both, (g64 / (rel[:, None] * rel[None, :] * top * top)).clamp(-1.0, 1.0), identity)
    cosines = torch.where(identity.bool(), 1.0, cosines)
    # drop the eigenvalues at the noise level of G's dtype: directions G cannot resolve are exact null directions,
    # so an unsolvable problem diverges (and is detected) instead of converging to a noise-made solution
    eigenvalues, vectors = torch.linalg.eigh(cosines)
    significant = eigenvalues > eigenvalues[-1] * n * torch.finfo(gramian.dtype).eps
    cosines = (vectors * torch.where(significant, eigenvalues, 0.0)) @ vectors.T
    b = rel.pow(1 / alpha - 1)
    steps = _STEPS.to(device)
    first = steps == 1  # the full step
    infinity = torch.tensor(torch.inf, dtype=torch.float64, device=device)
    bound = 1e12 ** (alpha / (1 + alpha))

    def objective(v: Tensor) -> Tensor:  # F along the last axis (evaluates a batch of candidates at once)
        return 0.5 * (torch.matmul(v, cosines) * v).sum(-1) - (b * _utility(v, alpha)).sum(-1)

    # the previous step's solution is a close start (the scaled variables are O(1) whatever the gradients' scale)
    ones = torch.ones(n, dtype=torch.float64, device=device)
    v = ones if init is None or init.shape != (n,) else torch.where(active & (init > 0), init.to(ones), ones)
    stalled = torch.zeros((), dtype=torch.bool, device=device)
    converged = diverged = stuck = False
    for _ in range(max_iter):
        target = b * v.pow(-1 / alpha)
        gradient = cosines @ v - target
        residual = (gradient / target).abs().max()
        # one device→host read per iteration: the loop must know when to stop (K × K work per iteration)
        converged, diverged, stuck = torch.stack([residual <= tol, v.max() > bound, stalled]).tolist()
        if converged or diverged or stuck:
            break
        hessian = cosines + torch.diag(target / (alpha * v))
        step, info = torch.linalg.solve_ex(hessian, gradient)  # info > 0: numerically singular (v → ∞)
        delta = -step
        # largest step keeping v > 0 (fraction to the boundary): −v/δ where δ < 0
        longest = torch.clamp(0.99 * torch.where(step > 0, v / step, infinity).min(), max=1.0)
        # Armijo backtracking over a batch of steps, F at v evaluated with them (row 0 is v itself)
        candidates = v + (longest * steps)[:, None] * delta
        values = objective(torch.cat([v[None], candidates]))
        current = values[0]
        slope = gradient @ delta  # −λ², λ the Newton decrement
        # near the solution the predicted decrease λ²/2 drowns in the rounding of F: take the (full) Newton step
        decrease = (values[1:] <= current + 1e-4 * longest * steps * slope) | (
            first & (-slope <= 1e-8 * (1 + current.abs()))
        )
        stalled = ~decrease.any() | (info > 0)
        v = torch.where(stalled, v, candidates[torch.argmax(decrease.to(torch.int64))])
    else:
        residual = ((cosines @ v - b * v.pow(-1 / alpha)) / (b * v.pow(-1 / alpha))).abs().max()
        converged = bool(residual <= tol)
    note = ""
    if diverged:
        note = "no w > 0 solves G w = w^(-1/α) (some gradients have 0 in their convex hull): zero update"
    elif not converged:
        note = f"G w = w^(-1/α) not solved to relative residual {tol}: used the last Newton iterate"
    kappa = top.pow(-2 * alpha / (1 + alpha))
    weights = torch.where(active & (not diverged), kappa * v / rel, 0.0)
    return weights.to(gramian.dtype), v if converged else None, bool(converged), note


class FairGrad(GradientBalancer):
    """FairGrad: update = Jᵀw with w > 0 the α-fair allocation,

        G w = w^(−1/α)   ⇔   (g_k · Jᵀw) = w_k^(−1/α) for every task k

    (α = 1: proportional fairness, the condition Nash-MTL also solves; α → ∞: max-min fairness). Solved by
    damped Newton on the strictly convex F(w) = ½wᵀGw − Σ_k φ_α(w_k), φ_α(w) = log w (α = 1) or
    w^(1−1/α)/(1−1/α), with a fraction-to-the-boundary rule that keeps w > 0 and Armijo backtracking.

    Paper: H. Ban, K. Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, arXiv:2402.15638.

    Args:
        alpha: fairness α > 0. Default 1.0, the reference code's default (its QM9 script uses 2.0).
        tol: relative residual max_k |(Gw)_k − w_k^(−1/α)| / w_k^(−1/α) accepted as solved (default 1e-6).
        max_iter: Newton iterations (default 100; on random gradient sets, norms spread over six orders of
            magnitude included, the median is 4–8 and the maximum about 30, for α = 5, from a cold start; each
            step starts from the previous step's solution, kept in ``state_dict()``, which typically needs 1–3).
        max_norm: clip the norm of the update; default 1.0 as the reference training scripts (``--max_norm``).

    On failure (reported in ``Combination.converged`` / ``BalanceResult.converged``, warned once): when no
    solution exists (e.g. two exactly opposite gradients: no direction improves both) the weights are 0, so the
    shared parameters get no update; when the line search stalls or ``max_iter`` runs out, the last iterate is
    used. Tasks whose gradient is exactly zero get weight 0 and the others are solved for.

    Differences from the reference code, and why:
    - The reference minimises ‖Gw − w^(−1/α)‖² with SciPy's bounded ``least_squares`` on the CPU and silently
      uses whatever it returns; ours solves the convex problem exactly on G's device and says when it cannot.
    - The authors' code multiplies the update by K ("to match the sum loss") before clipping it to norm 1; the
      update Jᵀw here is the paper's. For α = 1 the two coincide after the default clipping, since
      ‖Jᵀw‖² = wᵀGw = Σ_k w_k (Gw)_k = K ≥ 1 at the solution; for other α pass a larger ``max_norm`` (or learning
      rate) to match the reference.
    - No sum convention: the solution is not linear in the gradients (K equal gradients give √K·g/‖g‖ for α = 1).
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"
    options = ("alpha", "tol", "max_iter")
    state = fields(_warm=None)
    _warm: Tensor | None  # the previous step's solution, the next solve's start

    def __init__(
        self, alpha: float = 1.0, tol: float = 1e-6, max_iter: int = 100, max_norm: float | None = 1.0
    ) -> None:
        super().__init__(max_norm=max_norm)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol}")
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        self.alpha = float(alpha)
        self.tol = float(tol)
        self.max_iter = max_iter

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        weights, self._warm, converged, note = solve_fair_weights(
            matrix, self.alpha, self.tol, self.max_iter, init=self._warm
        )
        return Combination(weights=weights, converged=converged, note=note)
