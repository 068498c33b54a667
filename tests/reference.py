"""Shared test references: random Jacobians, method set-up, brute-force solutions (a helper module, not collected).

The per-method tests and tests/test_contract.py compare against these instead of each keeping its own copy.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from hypothesis import strategies as st
from torch import Tensor

from taskbalance.gradient_balancing.base import Combination, GradientBalancer
from taskbalance.loss_balancing.base import LossBalancer

F64 = torch.float64

Method = TypeVar("Method", bound=LossBalancer | GradientBalancer)


# -- factories -------------------------------------------------------------------------------------------------------
def jacobian(seed: int, k: int, p: int, shift: float = 0.0, dtype: torch.dtype = F64) -> Tensor:
    """A random K × P Jacobian; ``shift`` adds a common random row (correlated tasks, 0 more often off the hull)."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(k, p, generator=gen, dtype=dtype)
    if shift:
        jac = jac + shift * torch.randn(1, p, generator=gen, dtype=dtype)
    return jac


def set_up(method: Method, n_tasks: int) -> Method:
    """``method`` bound to K tasks, as a Balancer would bind it."""
    method.setup(n_tasks)
    return method


def loss_epochs(n_epochs: int, values: st.SearchStrategy[float]) -> st.SearchStrategy[list[list[list[float]]]]:
    """``n_epochs`` epochs of 1 to 3 steps of K losses drawn from ``values`` (K from 1 to 5, one K per example)."""
    return st.integers(min_value=1, max_value=5).flatmap(
        lambda k: st.lists(
            st.lists(st.lists(values, min_size=k, max_size=k), min_size=1, max_size=3),
            min_size=n_epochs,
            max_size=n_epochs,
        )
    )


# -- running a gradient method ---------------------------------------------------------------------------------------
def combine(method: GradientBalancer, jac: Tensor, losses: Tensor | None = None) -> Combination:
    """The method's combination of J: it reads G = J Jᵀ or J as ``method.needs`` says; unit losses by default."""
    matrix = jac @ jac.T if method.needs == "gramian" else jac
    result: Combination = method(matrix, torch.ones(jac.shape[0], dtype=jac.dtype) if losses is None else losses)
    return result


def weights(method: GradientBalancer, jac: Tensor, losses: Tensor | None = None, converged: bool = True) -> Tensor:
    """The method's weights for J, checking that its solver reported ``converged``."""
    combination = combine(method, jac, losses)
    assert combination.weights is not None and combination.converged == converged, combination.note
    return combination.weights


def update(combination: Combination, jac: Tensor) -> Tensor:
    """The shared update a combination stands for: its direction, else Jᵀw."""
    if combination.direction is not None:
        return combination.direction
    assert combination.weights is not None
    return combination.weights @ jac


# -- gradients by autograd -------------------------------------------------------------------------------------------
def flat_grad(output: Tensor, params: Sequence[Tensor]) -> Tensor:
    """∇ output over ``params``, flattened (the graph is kept for further rows)."""
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(output, params, retain_graph=True)])


def autograd_jacobian(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """J (K × P): row k is ∇ losses[k] over ``params``."""
    return torch.stack([flat_grad(loss, params) for loss in losses])


def accumulated(params: Sequence[Tensor]) -> Tensor:
    """The ``.grad`` of ``params``, flattened (each must have one)."""
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    return torch.cat([g.reshape(-1) for g in grads if g is not None])


# -- state -----------------------------------------------------------------------------------------------------------
def roundtrip(state: Any) -> Any:
    """``state`` through torch.save and torch.load(weights_only=True), as a checkpoint would go."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested state (tensors bit for bit, same dtype)."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# -- brute-force references ------------------------------------------------------------------------------------------
def supports(k: int) -> list[list[int]]:
    """Every non-empty subset of range(K), smallest first."""
    return [list(s) for size in range(1, k + 1) for s in itertools.combinations(range(k), size)]


def brute_min_norm(gram: Tensor) -> Tensor:
    """MGDA's w (the min-norm point of the hull) by enumerating supports: the equality-constrained optimum on each
    face, the best feasible one kept (small K, G ≻ 0)."""
    k = gram.shape[0]
    best, best_w = float("inf"), torch.zeros(k, dtype=F64)
    for idx in supports(k):
        a = torch.linalg.solve(gram[idx][:, idx], torch.ones(len(idx), dtype=F64))
        if (a >= 0).all() and a.sum() > 0:
            w = torch.zeros(k, dtype=F64)
            w[idx] = a / a.sum()
            if float(w @ gram @ w) < best:
                best, best_w = float(w @ gram @ w), w
    return best_w


def simplex_grid(k: int, n: int) -> Tensor:
    """The points of the simplex with coordinates in multiples of 1/n (K = 2 or 3)."""
    if k == 2:
        t = torch.linspace(0, 1, n + 1, dtype=F64)
        return torch.stack([t, 1 - t], dim=1)
    return torch.tensor([(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)], dtype=F64)


def descend(
    shared: Sequence[Tensor], update: Tensor, heads: Sequence[Tensor], head_grads: Sequence[Tensor], lr: float
) -> None:
    """One SGD step by hand: the flat ``update`` on the shared parameters, ``head_grads`` on the heads."""
    with torch.no_grad():
        for p, piece in zip(shared, torch.split(update, [p.numel() for p in shared]), strict=True):
            p.sub_(lr * piece.view_as(p))
        for p, g in zip(heads, head_grads, strict=True):
            p.sub_(lr * g)
