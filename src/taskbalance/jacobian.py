"""The engine: how the per-task gradients of the shared parameters are obtained and the update applied.

Given the balanced losses ℓ̃ (K,), the shared parameters θ and the task-specific parameters (heads), the engine
computes what the gradient method reads (J or G), lets the method combine, and accumulates

- into ``θ.grad``: the method's update (Jᵀ w or its explicit direction), clipped to ``method.max_norm``;
- into every head's ``.grad``: ∇ Σ_k ℓ̃_k (each head gets the gradient of its own balanced loss).

Gradients accumulate like an ordinary ``backward()`` (gradient accumulation across micro-batches works).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .gradient_balancing.base import Combination, GradientBalancer

EnginePath = Literal["auto", "loop"]
ENGINE_PATHS: tuple[str, ...] = ("auto", "loop")


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def _accumulate(params: Sequence[Tensor], flat: Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        piece = flat[offset : offset + n].view_as(p)
        offset += n
        if p.grad is None:
            p.grad = piece.detach().clone()
        else:
            p.grad.add_(piece)


def clip_update(update: Tensor, max_norm: float | None) -> Tensor:
    """Scale ``update`` so that its norm is at most ``max_norm`` (unchanged when None)."""
    if max_norm is None:
        return update
    norm = torch.linalg.vector_norm(update)
    return update * torch.clamp(max_norm / (norm + 1e-12), max=1.0)


def loop_jacobian(
    balanced: Tensor, shared: Sequence[Tensor], task_params: Sequence[Tensor]
) -> tuple[Tensor, list[Tensor | None]]:
    """J (K × P) by K autograd calls, and ∇ Σ_k ℓ̃_k of the task-specific parameters. The reference path."""
    inputs = [*shared, *task_params]
    rows: list[Tensor] = []
    head_grads: list[Tensor | None] = [None] * len(task_params)
    for k in range(balanced.shape[0]):
        grads = torch.autograd.grad(balanced[k], inputs, retain_graph=True, allow_unused=True)
        rows.append(_flat(grads[: len(shared)], shared))
        for i, g in enumerate(grads[len(shared) :]):
            if g is not None:
                previous = head_grads[i]
                head_grads[i] = g if previous is None else previous + g
    return torch.stack(rows), head_grads


def apply_gradient_method(
    balanced: Tensor,
    shared: Sequence[Tensor],
    task_params: Sequence[Tensor],
    method: GradientBalancer,
    features: Tensor | None = None,
    path: EnginePath = "auto",
) -> Combination:
    """Compute what ``method`` needs, combine, and accumulate the gradients. Returns the method's Combination."""
    if path not in ENGINE_PATHS:
        raise ValueError(f"unknown engine path {path!r}; choose from {', '.join(ENGINE_PATHS)}")
    jacobian, head_grads = loop_jacobian(balanced, shared, task_params)
    matrix = jacobian @ jacobian.T if method.needs == "gramian" else jacobian
    combination: Combination = method(matrix, balanced.detach())
    if combination.direction is not None:
        update = combination.direction
    else:
        assert combination.weights is not None
        update = combination.weights.to(jacobian.dtype) @ jacobian
    _accumulate(shared, clip_update(update, method.max_norm))
    for p, g in zip(task_params, head_grads, strict=True):
        if g is not None:
            p.grad = g.detach().clone() if p.grad is None else p.grad.add_(g)
    return combination
