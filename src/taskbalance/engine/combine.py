"""Handing J or G to the gradient method, checking what it returns, and turning that into the shared update.

A method that reads G gets Σ_p B_p B_pᵀ over the per-parameter blocks B_p (K, *p.shape) and its update is
Σ_k w_k B_p per block: J is never concatenated. A method that reads J gets the concatenation (K × P) and the update
is split back into the parameters. On the Gramian path ‖Jᵀw‖ = √(wᵀGw), so w is scaled before the update backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..gradient_balancing.base import Combination, GradientBalancer
from .context import StepContext
from .finite import require_finite, row_norms
from .grad import clip_factor, clip_update
from .vjp import BlockBuffers

_PLAIN = StepContext()


def reads_gramian(method: GradientBalancer) -> bool:
    """Whether the method is handed G: every method that does not need J itself (Sum reads nothing at all)."""
    return method.needs != "jacobian"


def call_method(method: GradientBalancer, matrix: Tensor, losses: Tensor) -> Combination:
    """The method's combination of ``matrix`` (J or G) for the detached ``losses``."""
    combination: Combination = method(matrix, losses)
    return combination


def apply_blocks(
    balanced: Tensor,
    shared: Sequence[Tensor],
    blocks: Sequence[Tensor | None],
    method: GradientBalancer,
    buffers: BlockBuffers | None = None,
    check: Sequence[Tensor | None] | None = None,
    context: StepContext = _PLAIN,
) -> tuple[Combination, list[Tensor | None], bool]:
    """The method's combination of the per-parameter blocks (K, *p.shape), and the clipped update of θ.

    Returns (combination, the update per shared parameter, whether the update is ``owned`` for
    :func:`~taskbalance.engine.grad.accumulate`); the caller writes it. With ``check`` (the other gradients of the
    step, possibly none), G or J and those are first required to be finite
    (:func:`~taskbalance.engine.finite.require_finite`): before the method runs and anything is written. The blocks
    carry the ``context``'s loss scale s: the method is handed G/s² or J/s and ℓ̃/s, and the update carries s.
    """
    n = balanced.shape[0]
    full = [b if b is not None else p.new_zeros((n, *p.shape)) for b, p in zip(blocks, shared, strict=True)]
    losses = context.unscaled(balanced.detach())

    def rows_finite() -> Tensor:
        return torch.stack([torch.isfinite(b.reshape(n, -1)).all(dim=1) for b in full]).all(dim=0)

    if reads_gramian(method):
        gramian = full[0].new_zeros((n, n))
        for block in full:
            flat = block.reshape(n, -1)
            gramian.addmm_(flat, flat.T)
        if check is not None:
            require_finite(gramian, check, rows_finite=rows_finite, agree=context.agree)
        combination = call_method(method, context.unscaled(gramian, 2), losses)
        weights = weights_for_gramian(combination, gramian, method, context.max_norm(method.max_norm))
        updates = [(weights.to(b.dtype) @ b.reshape(n, -1)).view(p.shape) for b, p in zip(full, shared, strict=True)]
        return combination, list(updates), True
    rows = [b.reshape(n, -1) for b in full]
    size = sum(r.shape[1] for r in rows)
    # J is valid during the method's call only (a method keeps copies, never J itself): reused across steps
    jacobian = torch.cat(rows, dim=1, out=None if buffers is None else buffers.get(("J",), (n, size), rows[0]))
    if check is not None:
        require_finite(row_norms(jacobian), check, rows_finite=rows_finite, agree=context.agree)
    combination = call_method(method, context.unscaled(jacobian), losses)
    if combination.direction is not None:
        check_direction(combination.direction, jacobian.shape[1], "the shared parameters")
        update = context.scaled(combination.direction.to(jacobian.dtype))
    else:
        assert combination.weights is not None
        check_weights(combination.weights, n)
        update = combination.weights.to(jacobian.dtype) @ jacobian
    max_norm = context.max_norm(method.max_norm)
    update = clip_update(update, max_norm)
    # a direction may be the method's own state: copied into .grad, never handed over
    owned = combination.direction is None or max_norm is not None or context.scale != 1.0
    return combination, list(torch.split(update, [p.numel() for p in shared])), owned


def weights_for_gramian(
    combination: Combination, gramian: Tensor, method: GradientBalancer, max_norm: float | None = None
) -> Tensor:
    """The method's w, scaled so that ‖Jᵀw‖ = √(wᵀGw) is at most ``max_norm`` (for G carrying a loss scale s: the
    method's ``max_norm`` times s; see :class:`~taskbalance.engine.context.StepContext`)."""
    if combination.weights is None:
        raise ValueError(
            f"{type(method).__name__} reads only G (needs='gramian') but returned no weights: a method that never "
            "sees J must express its update as weights"
        )
    check_weights(combination.weights, gramian.shape[0])
    weights = combination.weights.to(gramian.dtype)
    if max_norm is None:
        return weights
    norm = torch.sqrt(torch.clamp(weights @ gramian @ weights, min=0.0))
    return weights * clip_factor(norm, max_norm)


def check_weights(weights: Tensor, n: int) -> None:
    if weights.shape != (n,):
        raise ValueError(f"a gradient method returned weights of shape {tuple(weights.shape)}, expected ({n},)")


def check_direction(direction: Tensor, size: int, what: str) -> None:
    if direction.shape != (size,):
        raise ValueError(
            f"a gradient method returned a direction of shape {tuple(direction.shape)}, expected ({size},): "
            f"one entry per coordinate of {what}"
        )
