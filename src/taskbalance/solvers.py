"""Small solvers on the K × K Gramian G = J Jᵀ, shared by the gradient-balancing methods.

- :func:`project_simplex`: Euclidean projection onto the probability simplex Δ = {w ≥ 0, Σ w = 1}.
- :func:`min_norm_point`: the w ∈ Δ minimising wᵀGw, so that Jᵀw is the min-norm element of conv{g_k} (MGDA).
- :func:`lower_bounded_qp`: min vᵀGv s.t. v ≥ u, row by row for a batch of u (UPGrad's dual-cone projections).
- :func:`linear_plus_norm`: the w ∈ Δ minimising bᵀw + ρ‖Jᵀw‖ (CAGrad's dual problem, IMGrad's objective).

Everything is torch-native and stays on the input's device: no SciPy, no copy of the problem to the host. The
problems are K × K (K = number of tasks), so every solver works in float64 internally, at no measurable cost,
which keeps its decisions reliable when gradient norms differ by many orders of magnitude; results come back in
the input's dtype. The quadratic programs are solved exactly (up to rounding) by a primal active-set method:
its answer is the solution of the equality-constrained problem on the final active set, so a warm start changes
the number of iterations, not the result. The loops stop on data-dependent tests, so each iteration reads a
boolean or two from the device (a synchronisation on CUDA, microseconds against the K backward passes that
produced G); the problem data never leave it. Small problems skip the loop, since the cost of a solve at small
K is the number of torch operations, not arithmetic: up to K = 6 every working set is solved in one batch and
the feasible candidate of least objective is the answer; up to K = 12 the warm start's working set and its K
neighbours are, for a single problem (not UPGrad's batch), with the active set behind them; the min-norm point
of two gradients has a closed form, and so has :func:`linear_plus_norm`'s stationary point on a given support.
Each gives the active-set method's answer, with one read per solve (the
finite check) or none. Without a linear term (MGDA, UPGrad) an answer must also satisfy its own equations: a
working set whose matrix has an eigenvalue near the ridge (dependent gradients nearly spanning a face) defeats the
ridged solve and its refinements, and is solved again with the pseudo-inverse (the minimum-norm solution); where
even that leaves a KKT residual above ACCURACY·(1 + max|x|), the answer is reported unconverged.

Every problem is made strictly convex by a relative ridge G + δ·(diag G + δ·max diag G), δ = 1e-8: it
perturbs each gradient by a private orthogonal component of relative size 1e-4 in norm, which picks, among
several optimal weight vectors (duplicate or dependent gradients), the one spreading weight most evenly. δ =
√ε(float64) balances the two errors: the ridge moves the solution by about δ, and rounding in the ridged
systems (condition up to 1/δ) by about ε/δ; both are 1e-8 relative, far below float32's resolution of G.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

#: relative ridge that makes every quadratic strictly convex (see the module docstring)
RIDGE = 1e-8
#: a working-set solution of a problem without a linear term is accepted when its KKT residual on the free
#: variables, |m_k|·(1 + |x_k − l_k|) (m the multipliers, G scaled to max G_kk = 1), is at most this times
#: 1 + max|x|; above it the solve missed its own equations (see :meth:`_KKT.least_norm`)
ACCURACY = 1e-10
#: singular values below this fraction of the largest are dropped by the minimum-norm solve (rounding noise)
PINV_RTOL = 1e-12


@dataclass(frozen=True)
class SolverResult:
    """A solver's answer.

    Attributes:
        x: the solution, in the input's dtype and on its device (shape (K,), or (B, K) for a batch).
        iterations: iterations used (outer iterations for :func:`linear_plus_norm`).
        residual: relative KKT residual of ``x`` (0-dim tensor, the maximum over a batch): 0 at the exact
            solution; each solver documents its definition.
        converged: whether the solver met its stopping criterion within its iteration budget.
    """

    x: Tensor
    iterations: int
    residual: Tensor
    converged: bool


def project_simplex(y: Tensor) -> Tensor:
    """Euclidean projection of ``y`` (..., K) onto the simplex along the last axis (sort-based, exact)."""
    k = y.shape[-1]
    u, _ = torch.sort(y, dim=-1, descending=True)
    cumulative = u.cumsum(dim=-1) - 1
    index = torch.arange(1, k + 1, device=y.device, dtype=y.dtype)
    support = (u - cumulative / index > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = cumulative.gather(-1, support - 1) / support.to(y.dtype)
    return (y - theta).clamp_min(0)


def _finite(*tensors: Tensor) -> Tensor:
    """Whether every entry is finite (NaN/Inf gradients would otherwise loop to max_iter), on the device."""
    finite = torch.isfinite(tensors[0]).all()
    for tensor in tensors[1:]:
        finite = finite & torch.isfinite(tensor).all()
    return finite


def _non_finite(solver: str) -> ValueError:
    return ValueError(f"{solver} got non-finite input (NaN or Inf gradients?)")


class _InputCheck(NamedTuple):
    """A public solver's finite-input flag, left on the device so that :func:`_qp` can read it together with its
    own decision (one read instead of two), and the solver's name for the error."""

    finite: Tensor
    solver: str

    def require(self) -> None:
        """Refuse non-finite input: one read from the device."""
        if not bool(self.finite):
            raise _non_finite(self.solver)


def _regularised(h: Tensor, base: Tensor | None = None) -> Tensor:
    """h + δ·(diag(base) + δ·max diag(base)); ``base`` defaults to h. h + I when ``base`` is zero (G = 0: every
    point is optimal; the identity picks the smallest weights). Decided on the device, without a read."""
    diag = (h if base is None else base).diagonal().clamp_min(0)
    top = diag.max()
    # (top <= 0) adds the identity exactly when G = 0 (then diag = 0 and the ridge term vanishes)
    return h + torch.diag(RIDGE * (diag + RIDGE * top) + (top <= 0))


@dataclass(frozen=True)
class _QP:
    """min ½xᵀhx + qᵀx s.t. x ≥ lower, or over the simplex (x ≥ 0, Σx = 1) when ``lower`` is None, for ``batch``
    problems that share h: one per row of ``q`` / ``lower`` (B, K); q = 0 when None.

    ``h`` (K, K) is positive definite, float64. When ``exact`` is given, ``h`` is its ridged version: the systems
    are factored with ``h`` and the answer refined against ``exact`` (see :meth:`_KKT.refined`), and optimality is
    judged with ``exact``. None is kept apart from zeros because the enumeration takes shortcuts for q = 0.
    """

    h: Tensor
    q: Tensor | None
    lower: Tensor | None
    exact: Tensor | None = None
    batch: int = 1

    @property
    def k(self) -> int:
        return self.h.shape[-1]

    @property
    def simplex(self) -> bool:
        return self.lower is None

    @property
    def consistent(self) -> bool:
        """Whether every working set's equality-constrained problem has a solution: true without a linear term
        (½xᵀGx is bounded below on every face), so a solve that misses its equations is inaccurate, never the
        sign of an unbounded face (as it may be for the SQP's subproblems, whose q need not lie in G's range)."""
        return self.q is None

    @property
    def h_exact(self) -> Tensor:
        return self.h if self.exact is None else self.exact

    @functools.cached_property
    def zeros(self) -> Tensor:
        return torch.zeros(self.batch, self.k, dtype=self.h.dtype, device=self.h.device)

    @property
    def linear(self) -> Tensor:
        """q as a (B, K) tensor, zeros when None."""
        return self.zeros if self.q is None else self.q

    @property
    def bounds(self) -> Tensor:
        """The lower bounds as a (B, K) tensor: zeros on the simplex."""
        return self.zeros if self.lower is None else self.lower


@functools.lru_cache(maxsize=64)
def _identity(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=dtype, device=device)


class _KKT(NamedTuple):
    """The KKT matrix of a :class:`_QP` on a working set, symmetrically scaled to unit diagonal (S = diag(h)^−½),
    with the simplex row Σx = 1 as a border: [[S h S, −e], [eᵀ, 0]], e = S·1 / max S. It is assembled once per
    problem; a working set masks the rows of its fixed variables to the identity (their value is the bound), so
    every working set's system is a ``torch.where`` away, and many are solved in one batch. Used by both
    :func:`_active_set` (one working set per problem and iteration) and :func:`_enumerated` (many candidates)."""

    full: Tensor  # (2, n, n): the bordered matrix for h, then for the exact matrix
    eye: Tensor  # (n, n)
    scale: Tensor  # S's diagonal (K,)
    top: Tensor  # max S: the border is divided by it (e, and 1/top on the right) and μ = z_n / top
    simplex: bool
    refine: bool  # an exact matrix was given: refine against full[1]

    @property
    def k(self) -> int:
        return self.scale.shape[0]

    @property
    def n(self) -> int:
        """K, plus 1 for the simplex row."""
        return self.eye.shape[0]

    def factored(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """LU factors and pivots of the ridged systems of the working sets ``mask`` (..., n): True where free."""
        factors, pivots, _ = torch.linalg.lu_factor_ex(torch.where(mask[..., None], self.full[0], self.eye))
        return factors, pivots

    def refined(self, mask: Tensor, factors: Tensor, pivots: Tensor, rhs: Tensor, z: Tensor) -> Tensor:
        """The solution ``z`` (B, n, 1) of the ridged systems of the working sets ``mask`` (B, n), refined twice
        against the exact matrix when there is one (iterated Tikhonov with the ridged factors): that removes the
        ridge's bias (δ³) while keeping its conditioning and its even split between dependent gradients."""
        if self.refine:
            system_exact = torch.where(mask[..., None], self.full[1], self.eye)
            for _ in range(2):
                z = z + torch.linalg.lu_solve(factors, pivots, rhs - system_exact @ z)
        return z

    def least_norm(self, mask: Tensor, rhs: Tensor) -> Tensor:
        """The minimum-norm solution (B, n, 1) of the exact systems of the working sets ``mask`` (B, n): for a
        working set whose matrix has eigenvalues near the ridge δ (dependent gradients nearly spanning a face), the
        ridged solve and its two refinements keep a large part of the ridge's bias (each leaves a factor
        δ/(λ + δ) of it), and the solution misses its own equations. The pseudo-inverse solves them to rounding
        and, where the exact matrix is singular (more free variables than the rank of G), picks the solution of
        least norm, bounded as the ridge's pick is. Singular values below PINV_RTOL of the largest are rounding
        noise and dropped; one refinement with the pseudo-inverse follows."""
        system = torch.where(mask[..., None], self.full[1], self.eye)
        inverse: Tensor = torch.linalg.pinv(system, rtol=PINV_RTOL)
        z = inverse @ rhs
        return z + inverse @ (rhs - system @ z)

    def point(self, z: Tensor) -> Tensor:
        """x (B, K) from a scaled solution z (B, n, 1)."""
        return self.scale * z[:, : self.k, 0]

    def multiplier(self, z: Tensor, zeros: Tensor) -> Tensor:
        """μ (B, 1), the multiplier of Σx = 1 (0 without the simplex; ``zeros`` (B, K)), from z (B, n, 1)."""
        return z[:, self.k :, 0] / self.top if self.simplex else zeros[:, :1]


def _kkt(problem: _QP) -> _KKT:
    h, k = problem.h, problem.k
    dtype, device = h.dtype, h.device
    scale = h.diagonal().clamp_min(torch.finfo(dtype).tiny).rsqrt()
    n = k + int(problem.simplex)
    top = scale.max()
    full = torch.zeros(2, n, n, dtype=dtype, device=device)
    full[:, :k, :k] = torch.stack([h, problem.h_exact]) * scale[:, None] * scale[None, :]
    if problem.simplex:
        e = scale / top
        full[:, :k, k] = -e
        full[:, k, :k] = e
    return _KKT(full, _identity(n, dtype, device), scale, top, problem.simplex, problem.exact is not None)


def _free_slack(multipliers: Tensor, lower: Tensor, x_hat: Tensor, free: Tensor) -> Tensor:
    """The KKT residual on the free variables, per row: dual feasibility |m_k| and complementarity |x_k − l_k|·|m_k|
    at once (m: the multipliers, which a working set's solution zeroes on its free variables)."""
    return torch.where(free, multipliers.abs() * (1 + (x_hat - lower).abs()), 0.0).amax(dim=-1)


class _KKTTest(NamedTuple):
    """:func:`_kkt_test`'s verdict on each row's working-set solution."""

    feasible: Tensor
    optimal: Tensor  # feasible, and no fixed variable's multiplier negative beyond rounding
    worst: Tensor  # the fixed variable with the most negative multiplier
    multipliers: Tensor  # ∂/∂x_k of the Lagrangian (B, K)
    size: Tensor  # 1 + max|x| (B,)

    def accurate(self, lower: Tensor, x_hat: Tensor, free: Tensor) -> Tensor:
        """Whether the solution satisfies its own equations (the free variables' multipliers vanish) to ACCURACY:
        meaningful for a consistent problem (see _QP.consistent)."""
        return _free_slack(self.multipliers, lower, x_hat, free) <= ACCURACY * self.size

    def kkt(self, accurate: Tensor, free: Tensor) -> Tensor:
        """The KKT conditions to ACCURACY: feasible, ``accurate``, and no fixed variable's multiplier below
        −ACCURACY·(1 + max|x|); the test for a solution whose multipliers carry more than rounding error (an
        ill-conditioned working set's, see _active_set)."""
        dual = torch.where(free, 0.0, self.multipliers) >= -ACCURACY * self.size[:, None]
        return self.feasible & accurate & dual.all(dim=-1)


def _kkt_test(h_exact: Tensor, q: Tensor, lower: Tensor, x_hat: Tensor, mu: Tensor, free: Tensor) -> _KKTTest:
    """(feasible, optimal, the fixed variable with the most negative multiplier, …) of each row's working-set
    solution; a multiplier counts as negative beyond the rounding error of the terms it sums."""
    size = 1 + x_hat.abs().amax(dim=-1, keepdim=True)
    feasible = ((x_hat >= lower - 1e-12 * size) | ~free).all(dim=-1)
    # multipliers of the bounds in the working set: ∂/∂x_k of the Lagrangian
    multipliers = x_hat @ h_exact + q - mu
    terms = x_hat.abs() @ h_exact.abs() + q.abs() + mu.abs()
    candidates = torch.where(free, torch.inf, multipliers / terms.clamp_min(torch.finfo(x_hat.dtype).tiny))
    worst_value, worst = candidates.min(dim=-1)
    return _KKTTest(feasible, feasible & (worst_value >= -1e-12), worst, multipliers, size[:, 0])


def _taken(problem: _QP, x_hat: Tensor, free: Tensor) -> Tensor:
    """A feasible working-set solution as an iterate: fixed variables exactly on their bound."""
    lower = problem.bounds
    x = torch.where(free, torch.maximum(x_hat, lower), lower)
    return x / x.sum(dim=-1, keepdim=True) if problem.simplex else x


def _active_set(problem: _QP, kkt: _KKT, x0: Tensor, max_iter: int) -> tuple[Tensor, int, bool]:
    """Primal active-set method for ``problem``, one problem per row of ``x0`` (B, K), which is feasible.

    Each iteration solves the equality-constrained problem with the variables of the working set fixed at their
    bound (Nocedal & Wright, Numerical Optimization, Alg. 16.3): a feasible solution is taken, then the bound
    with the most negative multiplier is released; an infeasible one is approached until the first bound
    blocks, which joins the working set. The working set starts as the bounds that ``x0`` touches, so a warm start
    with the right support costs one iteration. Each iteration's systems are masked from ``kkt`` and, when the
    problem has an exact matrix, refined against it; multipliers are taken with the exact matrix.
    For a consistent problem (_QP.consistent) every solution must also satisfy its own equations (_kkt_test's
    ``accurate``): a row whose solve missed them decides nothing and repeats the iteration with the minimum-norm
    solve (:meth:`_KKT.least_norm`), which it keeps from then on; a row whose minimum-norm solve misses them too
    stops, and the answer is reported unconverged (never a converged answer that violates the KKT conditions).
    Every iteration reads one boolean from the device (the loop's exit depends on the data), or, for a consistent
    problem, three at once.
    """
    batch, k = problem.batch, problem.k
    q, lower = problem.linear, problem.bounds
    device = lower.device
    # right-hand sides of the scaled systems: −S q where free, lower / S where fixed, 1/top in the simplex row
    rhs_free = -kkt.scale * q
    rhs_fixed = lower / kkt.scale
    if problem.simplex:
        last = (1 / kkt.top).expand(batch, 1)
        rhs_free, rhs_fixed = torch.cat([rhs_free, last], 1), torch.cat([rhs_fixed, last], 1)
    border = torch.ones(batch, kkt.n - k, dtype=torch.bool, device=device)
    x = x0.clone()
    free = x > lower
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    consistent = problem.consistent
    # rows solved with the minimum-norm solve since theirs missed its equations, and rows where that missed them too
    precise, failed = torch.zeros_like(done), torch.zeros_like(done)
    any_precise = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        mask = torch.cat([free, border], dim=1)
        rhs = torch.where(mask, rhs_free, rhs_fixed)[:, :, None]
        factors, pivots = kkt.factored(mask)
        z = kkt.refined(mask, factors, pivots, rhs, torch.linalg.lu_solve(factors, pivots, rhs))
        if any_precise:
            z = torch.where(precise[:, None, None], kkt.least_norm(mask, rhs), z)
        x_hat, mu = kkt.point(z), kkt.multiplier(z, problem.zeros)
        test = _kkt_test(problem.h_exact, q, lower, x_hat, mu, free)
        feasible, optimal, worst = test.feasible, test.optimal, test.worst
        # infeasible: step from x toward x_hat until the first free variable reaches its bound
        step = x_hat - x
        ratio = torch.where(free & (step < 0), (lower - x) / step, torch.inf)
        alpha, block = ratio.min(dim=-1)
        x_step = x + alpha.clamp(0, 1)[:, None] * step
        x_step[rows, block] = lower[rows, block]
        x_taken = _taken(problem, x_hat, free)
        active = ~done
        if consistent:
            accurate = test.accurate(lower, x_hat, free)
            missed = active & ~accurate
            failed = failed | (missed & precise)
            precise = precise | missed
            active = active & accurate
            # the minimum-norm solve of an ill-conditioned working set is accurate to rounding times its condition,
            # not to rounding: its multipliers are judged by the KKT residual (a degenerate vertex's multipliers,
            # exactly 0, would otherwise come out slightly negative and release a bound again and again)
            if any_precise:
                optimal = optimal | (precise & test.kkt(accurate, free))
        take = active & feasible
        move = active & ~feasible
        x = torch.where(take[:, None], x_taken, torch.where(move[:, None], x_step, x))
        free = free.clone()
        free[rows, worst] |= take & ~optimal
        free[rows, block] &= ~move
        done = done | (take & optimal) | failed
        if consistent:  # the one read per iteration, with whether the next iteration needs the minimum-norm solve
            finished, any_precise, any_failed = torch.stack([done.all(), precise.any(), failed.any()]).tolist()
            if finished:
                return x, iterations, not any_failed
        elif bool(done.all()):  # the one read from the device per iteration: the loop's exit depends on the data
            return x, iterations, True
    return x, iterations, False


#: every working set is tried at once up to this many tasks (2^K small systems); the warm start's free set and
#: its K neighbours up to FLIPS (single problems); the active-set iterations beyond (or where those miss)
ENUMERATE = 6
FLIPS = 12
#: up to this many tasks, min_norm_point and linear_plus_norm first try the stationary points of the same candidate
#: supports in closed form (one batched solve, no ridge: :func:`_min_norm_candidate`, :func:`_norm_candidate`)
CLOSED_FORM = 12


@functools.lru_cache(maxsize=64)
def _all_free_sets(k: int, simplex: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every subset of {0, …, K−1} as a (1, M, K) boolean mask (the empty one left out for the simplex), and the
    same with the simplex row's border appended (1, M, K + 1)."""
    bits = (torch.arange(2**k, device=device)[:, None] >> torch.arange(k, device=device)) & 1
    masks = (bits[1:] if simplex else bits).bool()[None]
    return masks, torch.cat([masks, torch.ones(*masks.shape[:2], int(simplex), dtype=torch.bool, device=device)], -1)


@functools.lru_cache(maxsize=64)
def _flips(k: int, device: torch.device) -> Tensor:
    """(K + 1, K) boolean: no change, then each single variable flipped."""
    return torch.cat([torch.zeros(1, k, dtype=torch.bool, device=device), torch.eye(k, device=device).bool()])


def _enumerated(problem: _QP, kkt: _KKT, free: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x, whether it is the solution) per row of ``problem``, from many working sets solved in one batch, without
    a read.

    With ``free`` None (K ≤ ENUMERATE) every free set is tried, else the free set ``free`` (B, K) of the warm start
    and the K sets that differ from it in one variable. Each candidate is the equality-constrained solution on its
    working set, from the same scaled, bordered system an active-set iteration solves; every feasible one is a
    feasible point of the QP, and the QP's solution is the candidate of its own free set, so the feasible
    candidate of least objective is the solution whenever its free set is among the candidates (always when all
    are). Only the chosen candidate is refined against the exact matrix. Where only the neighbours were tried,
    the answer must also pass _active_set's KKT test.
    """
    q, lower, simplex = problem.q, problem.lower, problem.simplex
    k, n, batch = problem.k, kkt.n, problem.batch
    device = problem.h.device
    eye, scale, top = kkt.eye, kkt.scale, kkt.top
    neighbours = free is not None
    if free is None:
        masks, rows_mask = _all_free_sets(k, simplex, device)
    else:
        masks = free[:, None, :] ^ _flips(k, device)
        if simplex:  # an empty free set has no solution on the simplex: try the full one instead
            masks = masks | ~masks.any(dim=-1, keepdim=True)
        rows_mask = torch.cat([masks, torch.ones_like(masks[..., : n - k])], -1)
    count = masks.shape[1]
    factors, pivots = kkt.factored(rows_mask)
    # right-hand sides: −S q on free rows, lower / S on fixed ones, 1/top in the simplex row
    if simplex:
        last = eye[k] / top
        rhs = (
            last
            if q is None
            else torch.where(rows_mask, torch.cat([-scale * q, (1 / top).expand(batch, 1)], 1)[:, None], last)
        )
    else:
        assert lower is not None
        bound = (lower / scale)[:, None]
        rhs = torch.where(rows_mask, 0.0 if q is None else (-scale * q)[:, None], bound)
    rhs = rhs.expand(batch, count, n)
    z = torch.linalg.lu_solve(factors, pivots, rhs[..., None])[..., 0]
    x = scale * z[..., :k]
    size = 1 + x.abs().amax(dim=-1, keepdim=True)
    least = -1e-12 * size if lower is None else lower[:, None] - 1e-12 * size
    feasible = ((x >= least) | ~masks).all(dim=-1)
    if simplex and q is None:
        value = z[..., k]  # xᵀhx = μ·top·Σx on the simplex: every candidate's value up to the common factor top
    else:
        value = ((x @ problem.h) * x).sum(dim=-1) + (0.0 if q is None else 2 * (x * q[:, None]).sum(dim=-1))
    best = torch.where(feasible, value, torch.inf).argmin(dim=-1)
    index = (torch.arange(batch, device=device), best)
    mask = rows_mask.expand(batch, count, n)[index]
    z = z[index][..., None]
    if kkt.refine:  # only then are the chosen candidate's factors needed again
        factors = factors.expand(batch, count, n, n)[index]
        pivots = pivots.expand(batch, count, n)[index]
        z = kkt.refined(mask, factors, pivots, rhs[index][..., None], z)
    x = kkt.point(z)
    free = mask[:, :k]
    found = feasible.any(dim=-1)
    if neighbours:
        mu = kkt.multiplier(z, problem.zeros)
        test = _kkt_test(problem.h_exact, problem.linear, problem.bounds, x, mu, free)
        found = test.optimal & test.accurate(problem.bounds, x, free) if problem.consistent else test.optimal
    elif problem.consistent:
        # the chosen candidate must also satisfy its own equations, else the active set takes over (with the
        # minimum-norm solve, see _active_set): a consistent problem has q = 0
        multipliers = x @ problem.h_exact - kkt.multiplier(z, problem.zeros)
        size = 1 + x.abs().amax(dim=-1)
        found = found & (_free_slack(multipliers, problem.bounds, x, free) <= ACCURACY * size)
    bounds = 0.0 if lower is None else lower
    x = torch.where(free, x.clamp_min(0) if lower is None else torch.maximum(x, lower), bounds)
    return (x / x.sum(dim=-1, keepdim=True) if simplex else x), found


def _qp(
    problem: _QP,
    start: Callable[[], Tensor],
    max_iter: int,
    check: _InputCheck | None = None,
    verify: bool = True,
    support: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, int, bool]:
    """``problem`` solved exactly: the answer of :func:`_active_set` from ``start()`` (B, K).

    Up to ENUMERATE tasks, and up to FLIPS for a single problem, the candidate working sets are solved in one
    batch (:func:`_enumerated`; ``start`` is only called above ENUMERATE tasks); the active-set method takes over,
    started from their answer, only where that answer is not the solution. One read from the device for that
    decision, which also carries the caller's input ``check``. ``support()``, when given, is a cheaper guess of
    the free set of ``start()`` (B, K): the candidates' free sets are built around it, and the answer does not
    depend on it. With ``verify`` False and every working set tried (K ≤ ENUMERATE), there is no read: the answer
    is then a feasible point that is the solution unless rounding left every candidate infeasible (for callers
    that check optimality themselves, as the SQP does).
    """
    k, batch = problem.k, problem.batch
    kkt = _kkt(problem)
    # the neighbours pay for a single problem; for a batch (UPGrad's K) the active set's one or two warm iterations
    # on B systems cost less than B·(K + 1) candidates (measured: K = 7–12, B = K)
    if k > FLIPS or (k > ENUMERATE and batch > 1):
        if check is not None:
            check.require()
        return _active_set(problem, kkt, start(), max_iter)
    free = None if k <= ENUMERATE else (start() > problem.bounds if support is None else support())
    x, found = _enumerated(problem, kkt, free)
    if free is None and check is None and not verify:
        return x, 1, True
    finite = torch.ones((), dtype=torch.bool, device=problem.h.device) if check is None else check.finite
    ok, solved = torch.stack([finite, found.all()]).tolist()
    if not ok:
        assert check is not None
        raise _non_finite(check.solver)
    if solved:
        return x, 1, True
    x, iterations, converged = _active_set(problem, kkt, x, max_iter - 1)
    return x, iterations + 1, converged


def _simplex_qp(
    h: Tensor,
    q: Tensor | None,
    init: Tensor | None,
    max_iter: int,
    exact: Tensor | None = None,
    *,
    check: _InputCheck | None = None,
    project: bool = True,
    verify: bool = True,
) -> tuple[Tensor, int, bool]:
    """min ½wᵀhw + qᵀw over the simplex; h (K, K) positive definite, q (K,) or None (0), float64 (``exact``,
    ``check``, ``verify``: see _QP and _qp). ``init`` is projected onto Δ unless ``project`` is False (on Δ
    already)."""
    k = h.shape[0]

    def start() -> Tensor:
        if init is None:
            return torch.full((1, k), 1.0 / k, dtype=h.dtype, device=h.device)
        # weights at rounding level (a previous line search leaves some near 1e-18) start on their bound: each
        # one left free would cost an active-set iteration to remove
        x0 = project_simplex(init.to(h)) if project else init.to(h)
        x0 = torch.where(x0 > 1e-12 * x0.max(), x0, 0.0)
        return (x0 / x0.sum())[None]

    def support() -> Tensor:  # start()'s free set where init is on Δ already (a previous solution), else a guess
        if init is None:
            return torch.ones(1, k, dtype=torch.bool, device=h.device)
        return (init > 1e-12 * init.max())[None]

    problem = _QP(h, None if q is None else q[None], None, exact)
    x, iterations, converged = _qp(problem, start, max_iter, check, verify, support)
    return x[0], iterations, converged


def _symmetric(g: Tensor, top: Tensor) -> Tensor:
    """(G + Gᵀ) / (2·top): the problem scaled to max G_kk = 1 and made exactly symmetric. A Gramian formed by a
    float32 matmul (J Jᵀ, as the engine does) is symmetric only to its rounding (1e-7 relative at K = 10), and only
    the symmetric part enters wᵀGw; solving the working-set equations with G but taking the multipliers with Gᵀ
    left KKT residuals of that size, above ACCURACY, and reported exact answers as unconverged."""
    return (g + g.mT) / (2 * top)


def _default_iterations(k: int) -> int:
    return 10 * k + 50


def _min_norm_pair(g: Tensor) -> Tensor:
    """The min-norm point of two gradients in closed form (K = 2), the answer the active set gives:
    w = (t, 1 − t) with t = (g₂ − g₁)ᵀg₂ / ‖g₁ − g₂‖² = b/a (a = nᵀGn, b = −(Gn)₂, n = (1, −1)), taken on the
    ridged G (a > 0 always) and refined twice against G as the bordered systems are (t ← t + (b₀ − a₀t)/a, the
    same iterated Tikhonov reduced to the one free direction n); clamped to [0, 1] (a vertex) when the ridged t
    falls outside."""
    n = torch.tensor([1.0, -1.0], dtype=g.dtype, device=g.device)
    hn, gn = _regularised(g) @ n, g @ n
    a, b, a0, b0 = n @ hn, -hn[1], n @ gn, -gn[1]
    t = b / a
    refined = t + (b0 - a0 * t) / a
    refined = refined + (b0 - a0 * refined) / a
    t = torch.where((t >= 0) & (t <= 1), refined, t).clamp(0, 1)
    return torch.stack([t, 1 - t])


def _min_norm_candidate(g: Tensor, init: Tensor | None, check: _InputCheck) -> Tensor | None:
    """The min-norm point from the candidate supports in closed form (3 ≤ K ≤ CLOSED_FORM), or None where it does not
    settle the answer; one read, which also carries the input ``check``.

    On a support S the stationary point is w_S = G_S⁻¹1 / α, α = 1ᵀG_S⁻¹1, of value wᵀGw = 1/α (one batched solve
    for every support up to ENUMERATE tasks, else for the warm start's support and its K neighbours); the
    nonnegative one of least wᵀGw is taken when it satisfies the KKT conditions: its own equations to ACCURACY
    (|(Gw)_k − wᵀGw| on S) and strict complementarity ((Gw)_k − wᵀGw > 1e-9 off S, G scaled to max G_kk = 1), so
    that it is the unique solution. Degenerate problems (dependent gradients on the optimal face, a zero gradient,
    a multiplier at 0), where the ridged active set picks the most even of several solutions, get None."""
    k = g.shape[-1]
    support = None
    if k > ENUMERATE:
        start = torch.ones(k, dtype=g.dtype, device=g.device) if init is None else init.to(g)
        support = (start > 1e-12 * start.max())[None]
    masks, pairs = _supports(k, support, g.device)
    u = _support_solves(g, torch.ones_like(g[:, :1]), masks, pairs)[..., 0]
    alpha = u.sum(dim=-1)
    candidates = u / alpha[:, None]
    valid = (candidates >= -1e-12).all(dim=-1) & (alpha > 0)
    # ranked by wᵀGw itself, not by 1/α: a nearly singular G_S (dependent gradients) gives a meaningless α
    value = ((candidates @ g) * candidates).sum(dim=-1)
    choice = torch.where(valid, value, torch.inf).argmin()
    w = candidates[choice].clamp_min(0)
    w = w / w.sum()
    gw = g @ w
    slack = gw - w @ gw  # the multipliers (Gw)_k − wᵀGw
    on_support = masks[choice]
    settled = valid.any() & (torch.where(on_support, slack.abs() <= ACCURACY, slack > 1e-9)).all()
    ok, found = torch.stack([check.finite, settled]).tolist()
    if not ok:
        raise _non_finite(check.solver)
    return w if found else None


def min_norm_point(gramian: Tensor, init: Tensor | None = None, max_iter: int | None = None) -> SolverResult:
    """The w ∈ Δ minimising wᵀGw; Jᵀw is then the min-norm element of the convex hull of the rows of J.

    Exact for every K (active set, see the module docstring; closed form for K = 2, and for 3 ≤ K ≤ CLOSED_FORM
    the candidate supports' stationary points in closed form first, :func:`_min_norm_candidate`); ``init`` (K,)
    warm-starts it (projected onto Δ).
    Residual: the Frank–Wolfe gap (wᵀGw − min_k (Gw)_k) / max_k G_kk, which is ≥ 0 and 0 exactly at the KKT point
    ((Gw)_k ≥ wᵀGw for all k, with equality where w_k > 0).
    """
    k = gramian.shape[-1]
    g = gramian.to(torch.float64)
    g = _symmetric(g, g.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny))
    limit = _default_iterations(k) if max_iter is None else max_iter
    check = _InputCheck(_finite(gramian), "min_norm_point")
    w = _min_norm_candidate(g, init, check) if 2 < k <= CLOSED_FORM and limit > 0 else None
    if w is not None:
        iterations, converged = 1, True
    elif k == 2:
        w, iterations, converged = _min_norm_pair(g), 1, True
        check.require()
    else:
        w, iterations, converged = _simplex_qp(_regularised(g), None, init, limit, g, check=check)
    gw = g @ w
    residual = (w @ gw - gw.min()).clamp_min(0)
    return SolverResult(w.to(gramian.dtype), iterations, residual, converged)


def _lower_bounded_candidate(g: Tensor, bounds: Tensor, free: Tensor | None, check: _InputCheck) -> Tensor | None:
    """min vᵀGv s.t. v ≥ u for each row u of ``bounds`` (B, K) from candidate free sets in closed form (K ≤
    CLOSED_FORM), or None where that does not settle every row; one read, which also carries the input ``check``.

    With the free set F (the others on their bound) the stationary point is v_F = −G_FF⁻¹G_FX u_X; one batched
    solve for every free set (``free`` None, K ≤ ENUMERATE) or for each row's ``free`` (B, K) and its K
    neighbours, in the symmetric scaling of :func:`_support_solves`. The feasible candidate of least vᵀGv is
    taken when every row satisfies the KKT conditions: its own equations to ACCURACY ((Gv)_k = 0 on F, as
    _active_set judges them) and strict complementarity ((Gv)_k > 1e-9·(1 + max|v|) on the bound, G scaled to max
    G_kk = 1), so that it is the unique solution; degenerate rows (dependent gradients, a multiplier at 0) leave
    the whole batch to the ridged active set and its minimum-norm choices."""
    batch, k = bounds.shape
    device = g.device
    masks = _all_free_sets(k, False, device)[0] if free is None else free[:, None, :] ^ _flips(k, device)
    inverse_root = g.diagonal().clamp_min(torch.finfo(g.dtype).tiny).rsqrt()
    unit = g * torch.outer(inverse_root, inverse_root)
    system = torch.where(masks[..., :, None] & masks[..., None, :], unit, _identity(k, g.dtype, device))
    # scaled variables y = v / inverse_root: fixed ones at their bound, free ones balance them (unit is symmetric)
    fixed = torch.where(masks, 0.0, (bounds / inverse_root)[:, None, :])
    rhs = torch.where(masks, -(fixed @ unit), fixed)
    solution: Tensor = torch.linalg.solve_ex(system, rhs[..., None])[0]
    candidates = torch.where(masks, inverse_root * solution[..., 0], bounds[:, None, :])  # (B, M, K)
    size = 1 + candidates.abs().amax(dim=-1, keepdim=True)
    feasible = (candidates >= bounds[:, None, :] - 1e-12 * size).all(dim=-1)  # NaN (singular) is not
    value = ((candidates @ g) * candidates).sum(dim=-1)
    rows = torch.arange(batch, device=device)
    choice = torch.where(feasible, value, torch.inf).argmin(dim=-1)
    v, mask = candidates[rows, choice], masks.expand(batch, -1, -1)[rows, choice]
    v = torch.where(mask, torch.maximum(v, bounds), bounds)
    gv = v @ g
    size = 1 + v.abs().amax(dim=-1, keepdim=True)
    kkt = torch.where(mask, gv.abs() * (1 + (v - bounds).abs()) <= ACCURACY * size, gv > 1e-9 * size)
    ok, settled = torch.stack([check.finite, feasible.any(dim=-1).all() & kkt.all()]).tolist()
    if not ok:
        raise _non_finite(check.solver)
    return v if settled else None


def lower_bounded_qp(
    gramian: Tensor, lower: Tensor, init: Tensor | None = None, max_iter: int | None = None
) -> SolverResult:
    """For each row u of ``lower`` (B, K) or (K,): the v minimising vᵀGv subject to v ≥ u.

    With u ≥ 0, Jᵀv is the projection of Jᵀu onto the dual cone {x : Jx ≥ 0} of the rows of J (Quinton & Rey
    2024, Prop. 1). Started from v = max(init, u) when ``init`` (same shape as ``lower``, e.g. the previous step's
    solution) is given, else from v = u (all bounds active), so a Jᵀu already in the cone costs one iteration, and
    a warm start with the right free set one iteration too; the answer does not depend on the start. Up to
    K = CLOSED_FORM the candidate free sets (all, or the start's and its K neighbours) are first solved in closed
    form (:func:`_lower_bounded_candidate`), which answers with one read when every row passes the KKT test.
    Residual (KKT: Gv ≥ 0, (v − u)ᵀGv = 0): max(max_k (−(Gv)_k)₊, max_k |(v_k − u_k)(Gv)_k|) / max_k G_kk,
    over the batch.
    """
    single = lower.dim() == 1
    bounds = lower.to(torch.float64).reshape(-1, lower.shape[-1])
    g = gramian.to(torch.float64)
    g = _symmetric(g, g.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny))
    limit = _default_iterations(bounds.shape[-1]) if max_iter is None else max_iter

    def start() -> Tensor:
        if init is None:
            return bounds
        # entries within rounding of their bound start on it (each free one costs an iteration)
        previous = init.to(bounds).reshape(bounds.shape)
        size = 1 + previous.abs().amax(dim=-1, keepdim=True)
        return torch.where(previous - bounds > 1e-12 * size, previous, bounds)

    check = _InputCheck(_finite(lower, gramian), "lower_bounded_qp")
    k = bounds.shape[-1]
    found = None
    if k <= CLOSED_FORM and limit > 0:
        found = _lower_bounded_candidate(g, bounds, None if k <= ENUMERATE else start() > bounds, check)
    if found is not None:
        v, iterations, converged = found, 1, True
    else:
        problem = _QP(_regularised(g), None, bounds, g, batch=bounds.shape[0])
        v, iterations, converged = _qp(problem, start, limit, check)
    gv = v @ g
    residual = torch.maximum((-gv).clamp_min(0).amax(), ((v - bounds) * gv).abs().amax())
    x = v[0] if single else v
    return SolverResult(x.to(lower.dtype), iterations, residual, converged)


def _line_search(w: Tensor, p: Tensor, g: Tensor, b: Tensor, rho: float) -> Tensor:
    """argmin over t ∈ [0, 1] of f(w + t p), f(w) = bᵀw + ρ√(wᵀGw) (convex in t; closed form)."""
    gp = g @ p
    quad, cross, const = p @ gp, w @ gp, w @ g @ w
    slope = b @ p
    tiny = torch.finfo(torch.float64).tiny
    end_slope = slope + rho * (quad + cross) / (quad + 2 * cross + const).clamp_min(tiny).sqrt()
    # f'(t) = 0  ⇔  (quad·t + cross)/√(…) = γ, γ = −slope/ρ; squaring gives a quadratic whose relevant root is:
    gamma = -slope / rho
    ratio = (quad * const - cross**2).clamp_min(0) / (quad - gamma**2).clamp_min(tiny)
    root = (-cross + gamma * ratio.sqrt()) / quad.clamp_min(tiny)
    inner = torch.where(quad > tiny, root, torch.ones_like(root)).nan_to_num(1.0).clamp(0, 1)
    t = torch.where(end_slope <= 0, torch.ones_like(root), inner)
    # near the solution the root loses its digits to cancellation; the full (Newton) step is then as good
    value_t = slope * t + rho * (quad * t**2 + 2 * cross * t + const).clamp_min(0).sqrt()
    value_1 = slope + rho * (quad + 2 * cross + const).clamp_min(0).sqrt()
    return torch.where(value_1 <= value_t + 1e-15 * (slope.abs() + rho * const.sqrt()), torch.ones_like(t), t)


#: wᵀGw below this fraction of (Σ_k w_k‖g_k‖)² has lost its digits to cancellation; see resolved_norm_sq_tensor
NORM_FLOOR = 1e-10
#: ‖Jᵀw‖ below √SCALE_FLOOR = 1e-7 of the longest gradient is within the solvers' accuracy (√ε, the ridge) of 0
SCALE_FLOOR = 1e-14


def resolved_norm_sq_tensor(gramian: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(‖Jᵀw‖² = wᵀGw, whether it is distinguishable from 0), the flag a 0-dim bool tensor left on the device (no
    read). Computing wᵀGw rounds at about ε·(Σ_k |w_k|‖g_k‖)², and the weights themselves are accurate to about
    1e-8 (see RIDGE): below NORM_FLOOR times the first or SCALE_FLOOR·max_k ‖g_k‖², Jᵀw is numerically 0 (the
    gradients are Pareto-stationary)."""
    norm_sq = w @ gramian @ w
    diag = gramian.diagonal().clamp_min(0)
    bound = (w.abs() @ diag.sqrt()) ** 2
    return norm_sq, (norm_sq > NORM_FLOOR * bound) & (norm_sq > SCALE_FLOOR * diag.max())


class _Evaluation(NamedTuple):
    """f and its derivatives at the rows of a batch of points w (see :func:`linear_plus_norm`'s ``evaluate``)."""

    gw: Tensor  # Gw
    norm_sq: Tensor  # wᵀGw
    value: Tensor  # f(w)
    gap: Tensor  # the Frank–Wolfe gap
    resolved: Tensor  # whether Jᵀw is distinguishable from 0 (f is differentiable there)

    def row(self, i: int) -> _Evaluation:
        return _Evaluation(*(item[i] for item in self))


class _SQPFlags(NamedTuple):
    """The decisions of one SQP iteration of :func:`linear_plus_norm` about the line-search point ``new`` and the
    full step v, all read from the device at once."""

    decreased: bool  # f(new) ≤ f(w), up to rounding
    progress: bool  # new lowers the KKT gap or f (beyond rounding)
    take_full: bool  # the full step v is taken instead of new
    stalled: bool  # new is w, to rounding
    go_new: bool  # new leaves the KKT gap above tol (where f is differentiable)
    go_full: bool  # v leaves the KKT gap above tol
    damped: bool  # the line search strongly damped the Newton step
    ok_new: bool  # new is converged: resolved, gap ≤ tol
    ok_full: bool  # v is converged

    @classmethod
    def read(cls, **flags: Tensor) -> _SQPFlags:
        """The flags, given by name as 0-dim bool tensors, in one read."""
        return cls(*torch.stack([flags[name] for name in cls._fields]).tolist())


def _sqp_flags(
    evals: _Evaluation, new: Tensor, w: Tensor, before: Tensor, gap: Tensor, t: Tensor, scale: float, tol: float
) -> _SQPFlags:
    """One read for an SQP iteration of :func:`linear_plus_norm` (``evals``: its evaluation of the line-search
    point ``new``, row 0, and the full step v, row 1; ``before`` and ``gap``: f and the KKT gap at w)."""
    values, gaps, resolveds = evals.value, evals.gap, evals.resolved
    # near the solution f changes below its rounding error, so the line search cannot see the Newton step's gain
    # while the step still improves w; the full step v is then taken if f stays within rounding and the KKT gap
    # falls (the Newton convergence the line search would spoil)
    bound = before + 1e-15 * scale
    return _SQPFlags.read(
        decreased=values[0] <= bound,
        progress=(gaps[0] < gap) | (values[0] < before - 1e-15 * scale),
        take_full=(values[1] <= bound) & (gaps[1] < gaps[0]) & (gaps[1] < gap) & resolveds[1],
        stalled=(new - w).abs().max() <= 1e-15,
        go_new=resolveds[0] & (gaps[0] > tol),
        go_full=gaps[1] > tol,
        damped=t < 0.1,
        ok_new=resolveds[0] & (gaps[0] <= tol),
        ok_full=resolveds[1] & (gaps[1] <= tol),
    )


@functools.lru_cache(maxsize=64)
def _every_support(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every nonempty subset of {0, …, K−1} as (M, K) masks, and the (M, K, K) masks of their pairs."""
    masks = _all_free_sets(k, True, device)[0][0]
    return masks, masks[:, :, None] & masks[:, None, :]


def _supports(k: int, support: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every support (``support`` None), or ``support`` (1, K) and the K that differ from it in one variable (the
    empty one replaced by the full one), as masks (M, K) and pair masks (M, K, K)."""
    if support is None:
        return _every_support(k, device)
    masks = support ^ _flips(k, device)
    masks = masks | ~masks.any(dim=-1, keepdim=True)
    return masks, masks[:, :, None] & masks[:, None, :]


def _support_solves(g: Tensor, columns: Tensor, masks: Tensor, pairs: Tensor) -> Tensor:
    """G_S⁻¹c_S for every support S of ``masks`` (M, K) and every column c of ``columns`` (K, C): (M, K, C), exactly 0
    off S, not finite where G_S is singular. One batched solve of the symmetrically scaled systems D G_S D
    (D = diag(G)^−½, unit diagonal), so that the norms' spread does not enter the condition."""
    k = g.shape[-1]
    inverse_root = g.diagonal().clamp_min(torch.finfo(g.dtype).tiny).rsqrt()
    system = torch.where(pairs, g * torch.outer(inverse_root, inverse_root), _identity(k, g.dtype, g.device))
    rhs = torch.where(masks[:, :, None], columns * inverse_root[:, None], 0.0)
    solution: Tensor = torch.linalg.solve_ex(system, rhs)[0]
    return solution * inverse_root[:, None]


def _norm_candidate(g: Tensor, b: Tensor, rho: float, support: Tensor | None) -> Tensor:
    """The best point of Δ that is stationary for f(w) = bᵀw + ρ√(wᵀGw) on its support, among every support
    (``support`` None) or ``support`` (1, K) and its K neighbours: closed form, one batch, no read (not finite
    where no support has such a point; the caller checks the KKT gap either way).

    On a support S where f is differentiable, stationarity reads b_S + ρ·G_S w_S / n = μ·1 with n = √(wᵀGw), and
    1ᵀw = 1. With u = G_S⁻¹1, v = G_S⁻¹b_S, α = 1ᵀu, β = 1ᵀv, γ = b_Sᵀv, it gives w_S = (μu − v)/r with
    r = √(β² − α(γ − ρ²)) = ρ/n > 0 and μ = (β + r)/α; then f(w) = wᵀ∇f(w) = μ. So the supports cost one batched
    solve with two right-hand sides; the nonnegative candidate of least f (μ, for an exact solve) is the best."""
    k = g.shape[-1]
    masks, pairs = _supports(k, support, g.device)
    uv = _support_solves(g, torch.stack([torch.ones_like(b), b], dim=-1), masks, pairs)
    u, v = uv.unbind(dim=-1)
    alpha, beta = uv.sum(dim=1).unbind(dim=-1)
    r = (beta * beta - alpha * (v @ b - rho * rho)).clamp_min(0).sqrt()
    mu = (beta + r) / alpha
    w = (mu[:, None] * u - v) / r[:, None]
    w = w / w.sum(dim=-1, keepdim=True)
    valid = (w >= -1e-12).all(dim=-1) & (alpha > 0) & (r > 0)
    # a vertex needs no formula (r² = αρ² loses every digit to β² − αγ when ρ ≪ |b|): e_k, where g_k ≠ 0
    vertex = masks.sum(dim=-1) == 1
    w = torch.where(vertex[:, None], masks.to(w.dtype), w)
    valid = torch.where(vertex, (masks & (g.diagonal() > 0)).any(dim=-1), valid)
    # ranked by f itself, not by μ: a nearly singular G_S (dependent gradients) gives a finite but meaningless μ
    value = w @ b + rho * ((w @ g) * w).sum(dim=-1).clamp_min(0).sqrt()
    w = w[torch.where(valid, value, torch.inf).argmin()].clamp_min(0)
    return w / w.sum()


def linear_plus_norm(
    gramian: Tensor, b: Tensor, rho: float | Tensor, init: Tensor | None = None, max_iter: int = 50, tol: float = 1e-9
) -> SolverResult:
    """The w ∈ Δ minimising f(w) = bᵀw + ρ√(wᵀGw) (ρ ≥ 0): CAGrad's dual with b = G·1/K, ρ = c‖g₀‖.

    Sequential quadratic programming: at w, the exact second-order model of f (Hessian ρ/n·(G − GwwᵀG/n²),
    n = √(wᵀGw)) is minimised over Δ by the active-set solver, then an exact line search (closed form) moves
    along the segment; convergence is quadratic once the active face is found, and every step decreases f (up to
    its rounding: once f's decrease is below rounding, the full step is taken where it lowers the KKT gap, since
    the line search can no longer see it). The subproblem is factored with the ridge and refined against the
    exact Hessian (see :meth:`_KKT.refined`), so the ridge does not slow the Newton steps down. ``init``
    warm-starts it. Up to K = CLOSED_FORM tasks, where the start is not already the answer, the stationary points
    of every support (K ≤ ENUMERATE) or of the start's support and its K neighbours are first computed in closed
    form (:func:`_norm_candidate`, one batched solve): the best one is the answer, with one read and no SQP
    iteration, when it meets the same stopping criterion. With ρ = 0 (or G = 0) the problem is linear: w is
    uniform over argmin_k b_k. Reads from the
    device: one for the input check, the case analysis and the start's gap, then one per iteration (plus, for
    K > 6, the subproblem's one, see _qp).

    Residual: the Frank–Wolfe gap (∇fᵀw − min_k ∇f_k) / (max|b| + ρ·√max G_kk), an upper bound on the
    relative suboptimality; the solver stops when it is ≤ ``tol``. f is not differentiable where Jᵀw = 0, and
    wᵀGw computed from G loses its digits near there (:func:`resolved_norm_sq_tensor`): an iterate where Jᵀw is
    numerically 0 (the gradients are Pareto-stationary, 0 lies in their hull) stops the solver with
    ``converged=False``.
    """
    k = gramian.shape[-1]
    dtype, device = gramian.dtype, gramian.device
    g = gramian.to(torch.float64)
    lin = b.to(torch.float64)
    top = g.diagonal().max()
    lin_max = lin.abs().max()
    weight_t = torch.as_tensor(rho, dtype=torch.float64, device=device)
    # the problem scaled to max G_kk = 1, and the start evaluated, before the one read that checks the input, picks
    # the case below (ρ and the scales of G and b) and tells whether the start is already the solution
    g_scaled = _symmetric(g, top)
    root_top = top.sqrt()
    lin_scaled = lin / root_top
    diag = g_scaled.diagonal().clamp_min(0)
    root_diag, diag_top = diag.sqrt(), diag.max()
    tiny = torch.finfo(torch.float64).tiny

    def evaluate(points: Tensor, weight: float | Tensor, scale: float | Tensor) -> _Evaluation:
        """(Gw, wᵀGw, f(w), Frank–Wolfe gap, whether Jᵀw is resolved) for each row w of ``points``, at once."""
        gp = points @ g_scaled
        norm_sq = (points * gp).sum(dim=-1)
        # as resolved_norm_sq_tensor: wᵀGw is distinguishable from 0
        resolved = (norm_sq > NORM_FLOOR * (points.abs() @ root_diag) ** 2) & (norm_sq > SCALE_FLOOR * diag_top)
        value = points @ lin_scaled + weight * norm_sq.clamp_min(0).sqrt()
        grad = lin_scaled + weight * gp / norm_sq.clamp_min(tiny).sqrt()[:, None]
        gap = ((points * grad).sum(dim=-1) - grad.amin(dim=-1)).clamp_min(0) / scale
        return _Evaluation(gp, norm_sq, value, gap, resolved)

    def status(resolved: Tensor, gap: Tensor) -> list[Tensor]:
        return [resolved & (gap > tol), resolved, resolved & (gap <= tol)]

    uniform = torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)
    w = uniform if init is None else project_simplex(init.to(g))
    point = evaluate(w[None], weight_t, lin_max / root_top + weight_t).row(0)
    finite = torch.isfinite(g).all() & torch.isfinite(lin).all()
    read = torch.stack([finite, weight_t, top, lin_max, *status(point.resolved, point.gap)]).tolist()
    ok, weight, top_value, lin_max_value, go_on, differentiable, converged = read
    if not ok:
        raise _non_finite("linear_plus_norm")
    if not weight >= 0:
        raise ValueError(f"rho must be >= 0, got {weight}")
    # the norm term below rounding (ρ ≤ 1e-12·max|b|/√max G_kk) is the linear problem
    if weight == 0 or not top_value > 0 or weight <= 1e-12 * lin_max_value / math.sqrt(top_value):
        ties = lin <= lin.min() + 1e-12 * lin_max
        w = ties.to(torch.float64) / ties.sum()
        return SolverResult(w.to(dtype), 0, torch.zeros((), dtype=torch.float64, device=device), True)
    g, lin = g_scaled, lin_scaled
    scale = lin_max_value / math.sqrt(top_value) + weight
    if go_on and differentiable and k <= CLOSED_FORM and max_iter > 0:
        # the stationary points of the candidate supports in closed form: the answer when one of them meets the
        # SQP's own stopping criterion (differentiable, KKT gap ≤ tol), one read instead of the SQP's iterations
        candidate = _norm_candidate(g, lin, weight, None if k <= ENUMERATE else (w > 1e-12 * w.max())[None])
        best = evaluate(candidate[None], weight, scale).row(0)
        if bool(best.resolved & (best.gap <= tol)):
            return SolverResult(candidate.to(dtype), 1, best.gap, True)
    limit = _default_iterations(k)
    if not differentiable:  # start where f is differentiable
        for start in (uniform, torch.nn.functional.one_hot(g.diagonal().argmax(), k).to(g)):
            w = start
            point = evaluate(w[None], weight, scale).row(0)
            go_on, differentiable, converged = torch.stack(status(point.resolved, point.gap)).tolist()
            if differentiable:
                break
    iterations = 0
    # the ridge of every subproblem, relative to G (as a matrix), built only when there is one
    ridge = _regularised(torch.zeros_like(g), g) if go_on and max_iter > 0 else g
    while go_on and iterations < max_iter:
        iterations += 1
        norm = point.norm_sq.sqrt()
        # the model's Hessian is ρ/n·(G − GwwᵀG/n²); the subproblem is solved divided by ρ/n (same minimiser),
        # factored with a ridge and refined against the exact Hessian (no ridge bias: quadratic convergence)
        exact = g - torch.outer(point.gw, point.gw) / point.norm_sq
        linear = (norm / weight) * lin + point.gw - exact @ w
        v, _, _ = _simplex_qp(exact + ridge, linear, w, limit, exact=exact, project=False, verify=False)
        step = v - w
        t = _line_search(w, step, g, lin, weight)
        new = (w + t * step).clamp_min(0)  # a convex combination of two points of Δ: on Δ up to rounding
        new = new / new.sum()

        evals = evaluate(torch.stack([new, v]), weight, scale)
        flags = _sqp_flags(evals, new, w, point.value, point.gap, t, scale, tol)
        if flags.damped:
            # a strongly damped Newton step: the model is poor (near the kink at Jᵀw = 0). The majorize-minimize
            # step, argmin bᵀw + ρ(wᵀGw + n²)/(2n) (√ is below its tangent), always decreases f; take the better one.
            mm, _, _ = _simplex_qp(g + ridge, (norm / weight) * lin, w, limit, project=False, verify=False)
            new = torch.where(evaluate(mm[None], weight, scale).value[0] < evals.value[0], mm, new)
            evals = evaluate(torch.stack([new, v]), weight, scale)
            flags = _sqp_flags(evals, new, w, point.value, point.gap, t, scale, tol)
        if flags.take_full:
            w, point, go_on, converged = v, evals.row(1), flags.go_full, flags.ok_full
        elif flags.decreased and flags.progress and not flags.stalled:
            w, point, go_on, converged = new, evals.row(0), flags.go_new, flags.ok_new
        else:
            break
    return SolverResult(w.to(dtype), iterations, point.gap, bool(converged))
