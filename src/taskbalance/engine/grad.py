"""Every write into ``.grad``, and the clipping of the shared update.

Gradients accumulate like an ordinary ``backward()`` (gradient accumulation across micro-batches works). Two ways
in, and nothing else in taskbalance touches ``.grad``:

- :func:`backward`: an ordinary backward, where autograd accumulates itself (it takes the gradient without a copy
  where it can, and runs the hooks registered on gradient accumulation). The steps that need no per-task
  gradients use it (no balancing, and the reuse of amortised weights) when ``check_finite`` is off.
- :func:`accumulate`: gradients the engine computed (an update, per-task sums, gradients captured on the way),
  and those steps' gradients when they are checked first (:mod:`~taskbalance.engine.finite`): the same values.

Clipping: the shared update u is scaled by min(1, max_norm / ‖u‖).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .vjp import summed_gradient


def backward(outputs: Tensor, cotangents: Tensor | None = None, inputs: Sequence[Tensor] | None = None) -> None:
    """``torch.autograd.backward``: autograd adds vᵀ ∂outputs/∂p into ``p.grad`` for every leaf p (or ``inputs``)."""
    torch.autograd.backward(outputs, cotangents, inputs=None if inputs is None else list(inputs))


def accumulate(params: Sequence[Tensor], grads: Sequence[Tensor | None], owned: bool = False) -> None:
    """Add each gradient into its parameter's ``.grad`` like ``backward()`` does (a new tensor when None).

    ``owned`` says the gradients were made by the engine for this purpose and nothing else refers to them (an
    update computed here, a sum over tasks): a new ``.grad`` then takes the tensor itself when its layout is the
    parameter's. Otherwise (tensors from autograd, which may hand one tensor to two parameters; a method's
    direction, which may be its state) a copy in the parameter's layout is made, so that in-place work on one
    ``.grad`` (``zero_grad(set_to_none=False)``, clipping) cannot reach anything else.
    """
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        g = g.detach().reshape(p.shape)
        if g.dtype != p.dtype:  # .grad is in the parameter's own dtype (a bf16 product under autocast)
            g = g.to(p.dtype)
        if p.grad is not None:
            p.grad.add_(g)
        elif owned and g.stride() == p.stride():
            p.grad = g
        else:
            p.grad = torch.empty_like(p).copy_(g)


def unaliased(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Gradients from autograd made safe to hand over with ``owned=True``: one that shares memory with an earlier
    one (autograd may hand one tensor to two inputs) is copied."""
    seen: set[int] = set()
    out: list[Tensor | None] = []
    for g in grads:
        if g is not None:
            address = g.untyped_storage().data_ptr()
            if address in seen:
                g = g.clone()
            seen.add(address)
        out.append(g)
    return out


def accumulate_summed(balanced: Tensor, task_params: Sequence[Tensor]) -> None:
    """∇ Σ_k ℓ̃_k into the task parameters (heads, loss methods' own parameters); the graph is kept."""
    accumulate(task_params, summed_gradient(balanced, task_params))


def clip_update(update: Tensor, max_norm: float | None) -> Tensor:
    """Scale ``update`` so that its norm is at most ``max_norm`` (unchanged when None)."""
    if max_norm is None:
        return update
    return update * clip_factor(torch.linalg.vector_norm(update), max_norm)


def clip_factor(norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / norm): what scales an update of norm ``norm`` to at most ``max_norm``."""
    return torch.clamp(max_norm / (norm + 1e-12), max=1.0)


def clip_blocks(blocks: Sequence[Tensor | None], max_norm: float) -> list[Tensor | None]:
    """The blocks of one update, scaled together so that their joint norm is at most ``max_norm``."""
    norms = [torch.linalg.vector_norm(g) for g in blocks if g is not None]
    factor = clip_factor(torch.linalg.vector_norm(torch.stack(norms)), max_norm)
    return [None if g is None else g * factor for g in blocks]
