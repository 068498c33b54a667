"""The first half of the features-first path: J_z, the per-task gradients of ℓ̃ w.r.t. the features z.

With z the shared representation (the trunk's output) and every path from the shared parameters to ℓ̃ running
through z, the chain rule splits the per-task Jacobian into J = J_z · ∂z/∂θ: J_z through the heads here, then the
K products J_z[k] · ∂z/∂θ through the trunk (see :mod:`taskbalance.engine`).

Cost of J_z. A K-batched backward from ℓ̃ runs every head K times (K² head passes: the one-hot cotangent of task k
still sends zeros through the other heads). When the graph separates the tasks
(:func:`~taskbalance.engine.graph.task_split`: ℓ̃ = f(stack(L_1..L_K)) and each node reading z serves one task), a
hook on each consumer of z keeps what that consumer sends to z, filed under the task it serves, and far fewer head
passes are needed:

- ℓ̃_k a function of L_k alone (EW, UW, IGB, DB-MTL's log, ...: ∂ℓ̃/∂L diagonal): one backward of Σ_k ℓ̃_k, which
  also gives the heads their ∇ Σ_k ℓ̃_k. This is exactly an EW backward through the heads.
- otherwise (ℓ̃ mixes the losses): M = ∂ℓ̃/∂L (K × K, through the loss method only), D_j = ∂L_j/∂z from one
  backward of Σ_j L_j, J_z = M · D, and one more backward of Σ_k ℓ̃_k for the heads.

Otherwise the K-batched backward (or K backward calls when vmap fails) is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .graph import TaskSplit
from .vjp import BlockBuffers, VmapMemo, batched_vjp, summed_gradient


def features_jacobian(
    balanced: Tensor,
    features: Tensor,
    head_params: Sequence[Tensor],
    split: TaskSplit | None,
    memo: VmapMemo,
    buffers: BlockBuffers | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    """(J_z of shape (K, *features.shape), ∇ Σ_k ℓ̃_k for each of ``head_params``). The graph is kept.

    With ``buffers``, the captured J_z is written into a buffer reused from step to step (valid until the next call).
    """
    n = balanced.shape[0]
    eye = torch.eye(n, dtype=balanced.dtype, device=balanced.device)
    if split is not None and split.diagonal:
        return _captured_pass(balanced, features, head_params, split, torch.ones_like(balanced), buffers)
    if split is not None:
        stack_out = GradientEdge(split.stack, 0)
        mixing = batched_vjp(balanced, [stack_out], eye, memo, kind="mixing", final=False)[0]
        # a stack of K scalars gives M of shape (K, K); a stack of K head outputs (then reduced) does not split
        if mixing is not None and mixing.shape == (n, n):
            per_loss, _ = _captured_pass(stack_out, features, [], split, torch.ones_like(mixing[0]), buffers)
            jz = (mixing.to(features.dtype) @ per_loss.reshape(n, -1)).reshape(n, *features.shape)
            return jz, summed_gradient(balanced, head_params)
    grads = batched_vjp(balanced, [features, *head_params], eye, memo, kind="heads", final=False)
    first = grads[0]
    jz = first if first is not None else features.new_zeros((n, *features.shape))
    return jz, [None if g is None else g.sum(0) for g in grads[1:]]


def _captured_pass(
    output: Tensor | GradientEdge,
    features: Tensor,
    head_params: Sequence[Tensor],
    split: TaskSplit,
    ones: Tensor,
    buffers: BlockBuffers | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    """One backward of Σ ``output`` down to z and ``head_params``, keeping what each consumer of z sends to z.

    Returns (per-task sums of the captured gradients (K, *z.shape), the gradients of ``head_params``).
    """
    captured: list[Tensor | None] = [None] * len(split.consumers)
    handles = [
        node.register_hook(_capture(captured, k, slots))
        for k, nodes in enumerate(split.consumers)
        for node, slots in nodes
    ]
    try:
        grads = torch.autograd.grad(output, [features, *head_params], ones, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    shape = (len(captured), *features.shape)
    per_task = features.new_empty(shape) if buffers is None else buffers.get(("captured",), shape, features)
    for k, d in enumerate(captured):
        if d is None:
            per_task[k].zero_()
        else:
            per_task[k].copy_(d)
    return per_task, list(grads[1:])


def _capture(captured: list[Tensor | None], task: int, slots: list[int]) -> Callable[..., None]:
    def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: Any) -> None:
        for slot in slots:
            grad = grad_inputs[slot]
            if grad is not None:
                previous = captured[task]
                captured[task] = grad if previous is None else previous + grad

    return hook
