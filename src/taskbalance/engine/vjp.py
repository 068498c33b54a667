"""K vector-Jacobian products at once: batched through vmap, or one by one when vmap cannot run the graph.

``batched_vjp(outputs, inputs, cotangents)`` returns, for each input, the stacked products
[v_kᵀ ∂outputs/∂input]_k of shape (K, *input.shape), where v_k = ``cotangents[k]``. With the identity as
cotangents this is the per-task Jacobian. ``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward
graph once under vmap; when an op of the graph has no batching rule that vmap can use (a custom autograd Function
whose backward branches on values, ``.item()`` in a backward, ...) it raises, and the products are computed by K
ordinary backward calls instead. :class:`VmapMemo` remembers the failure so that later steps do not pay for a
failed attempt again, and warns once.

``summed_gradient`` is the one product with all-ones cotangents, ∇ Σ_k outputs_k: what task parameters receive.

``streaming_gramian`` is the memory-lean variant for methods that read only G = J Jᵀ: a hook on each parameter
turns its (K, *shape) block into its contribution J_p J_pᵀ as soon as the backward produces it and hands autograd
back a one-element stand-in, so the K × P Jacobian never exists at once (peak: the largest block).

Graph retention: a batched attempt keeps the graph (``retain_graph=True``) until vmap is known to work on this
part of the graph, because a failure half-way would leave a half-freed graph and no way to fall back. Once it worked,
the last pass of a step frees the graph like an ordinary ``backward()`` does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._C import _functorch
from torch.autograd.graph import GradientEdge

#: what products are taken with respect to: tensors, or edges of the graph (outputs of nodes)
Inputs = Sequence[Tensor] | Sequence[GradientEdge]


class EngineFallbackWarning(RuntimeWarning):
    """vmap could not run the backward graph; the engine fell back to K sequential backward calls."""


class VmapMemo:
    """What the engine learnt about vmap on this model, per kind of pass (``"trunk"``, ``"heads"``, ...).

    A kind of pass is unknown, known to work (in ``ok``) or known to fail (in ``failed``). Kinds are kept apart
    because vmap may run the heads and fail in the trunk: one success says nothing about another part of the graph.
    """

    def __init__(self) -> None:
        self.ok: set[str] = set()
        self.failed: set[str] = set()

    def retain(self, kind: str, final: bool) -> bool:
        """Whether a batched pass must keep the graph: always, unless it is the last and vmap is known to work."""
        return not (final and kind in self.ok)

    def record_failure(self, kind: str, error: BaseException, final: bool) -> None:
        """Note that vmap failed; re-raise when the graph was already freed (nothing left to fall back on)."""
        if not self.retain(kind, final):
            raise RuntimeError(
                "the batched backward failed although it worked on earlier steps, and the graph is freed; use "
                f"engine='loop' for this model. vmap said: {error}"
            ) from error
        if not self.failed:
            warnings.warn(
                f"taskbalance engine: vmap cannot run this backward graph ({type(error).__name__}: {error}); "
                "falling back to one backward call per task for that part of the graph from now on (correct, "
                "slower). Choose engine='loop' to silence this.",
                EngineFallbackWarning,
                stacklevel=5,
            )
        self.failed.add(kind)


class BlockBuffers:
    """Output tensors of the K-call loop, kept from step to step and overwritten in place.

    A (K, *shape) block of a large parameter is tens to hundreds of MB; a fresh one each step is a fresh mapping
    from the allocator, and on the CPU filling it costs a page fault per 4 KiB (about a third of the step for an
    MLP trunk with 40 tasks). The blocks never leave the engine (methods get G, or J concatenated into their own
    buffer, valid during the call), so the next step may overwrite them.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[object, ...], Tensor] = {}

    def get(self, key: tuple[object, ...], shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, the same one as last time."""
        full_key = (*key, shape, like.dtype, like.device)
        buffer = self._buffers.get(full_key)
        if buffer is None:
            buffer = self._buffers[full_key] = like.new_empty(shape)
        return buffer

    def clear(self) -> None:
        self._buffers.clear()


def loop_vjp(
    outputs: Tensor,
    inputs: Inputs,
    cotangents: Tensor,
    final: bool,
    buffers: BlockBuffers | None = None,
    kind: str = "",
) -> list[Tensor | None]:
    """The K products by K ordinary backward calls (the reference; works on every graph).

    Each task's gradients are copied into the (K, *shape) outputs as soon as they exist, so at most one task's
    gradients are alive besides the outputs; with ``buffers`` the outputs are reused across steps.
    """
    n = cotangents.shape[0]
    out: list[Tensor | None] = [None] * len(inputs)
    for k in range(n):
        last = final and k == n - 1
        grads = torch.autograd.grad(outputs, inputs, cotangents[k], retain_graph=not last, allow_unused=True)
        for i, g in enumerate(grads):
            block = out[i]
            if g is None:
                if block is not None:  # the input is unused by task k: a zero row
                    block[k].zero_()
                continue
            if block is None:  # first task that uses the input: earlier tasks get zero rows
                shape = (n, *g.shape)
                block = out[i] = g.new_empty(shape) if buffers is None else buffers.get((kind, i), shape, g)
                block[:k].zero_()
            block[k].copy_(g)
        del grads
    return out


def batched_vjp(
    outputs: Tensor,
    inputs: Inputs,
    cotangents: Tensor,
    memo: VmapMemo,
    kind: str,
    final: bool,
    try_vmap: bool = True,
    buffers: BlockBuffers | None = None,
) -> list[Tensor | None]:
    """The K products in one vmapped backward; K backward calls when vmap fails (or failed before).

    ``kind`` names the part of the graph for :class:`VmapMemo`; ``final`` says that no later pass of this step
    needs the graph. ``try_vmap=False`` goes straight to the loop (``engine='loop'``), whose outputs come from
    ``buffers`` when given (then valid until the next call with the same ``kind``).
    """
    if try_vmap and kind not in memo.failed:
        try:
            grads = torch.autograd.grad(
                outputs,
                inputs,
                cotangents,
                retain_graph=memo.retain(kind, final),
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as error:
            memo.record_failure(kind, error, final)
        else:
            memo.ok.add(kind)
            return list(grads)
    return loop_vjp(outputs, inputs, cotangents, final, buffers, kind)


def summed_gradient(outputs: Tensor, inputs: Sequence[Tensor]) -> list[Tensor | None]:
    """∇ Σ_k outputs_k for each of ``inputs`` (None where unused), keeping the graph for the passes that follow."""
    if not inputs:
        return []
    ones = torch.ones_like(outputs)
    return list(torch.autograd.grad(outputs, inputs, ones, retain_graph=True, allow_unused=True))


def streaming_gramian(
    outputs: Tensor,
    shared: Sequence[Tensor],
    summed: Sequence[Tensor],
    cotangents: Tensor,
    memo: VmapMemo,
    kind: str,
    final: bool,
) -> tuple[Tensor, list[Tensor | None]]:
    """G = Σ_p J_p J_pᵀ over the ``shared`` parameters, and Σ_k of the products for the ``summed`` ones.

    Each parameter's (K, *shape) block is reduced inside a tensor hook the moment the backward produces it
    (G += B Bᵀ for a shared block, B.sum(0) for a summed one) and replaced by a broadcast zero, so no more than
    one block is alive at a time. The hooks see vmap's batched tensors; ``torch._C._functorch.get_unwrapped``
    gives the physical (K, ...) tensor behind one (the private part of this module, held by the tests). When vmap
    fails the blocks come from K backward calls (all of J then exists, once).
    """
    n = cotangents.shape[0]
    dtype = shared[0].dtype
    gramian = torch.zeros(n, n, dtype=dtype, device=shared[0].device)
    sums: list[Tensor | None] = [None] * len(summed)
    kind = f"streamed {kind}"  # torch.func.vmap, not is_grads_batched: its own record
    if kind not in memo.failed:
        hooks = [p.register_hook(_gramian_hook(gramian, n)) for p in shared]  # type: ignore[no-untyped-call]
        hooks += [p.register_hook(_sum_hook(sums, i, n)) for i, p in enumerate(summed)]  # type: ignore[no-untyped-call]
        inputs = [*shared, *summed]
        retain = memo.retain(kind, final)

        def product(vector: Tensor) -> tuple[Tensor, ...]:
            return torch.autograd.grad(outputs, inputs, vector, retain_graph=retain, materialize_grads=True)

        try:
            torch.func.vmap(product)(cotangents)
        except RuntimeError as error:
            memo.record_failure(kind, error, final)
            gramian.zero_()
            sums = [None] * len(summed)
        else:
            memo.ok.add(kind)
            return gramian, sums
        finally:
            for handle in hooks:
                handle.remove()
    blocks = loop_vjp(outputs, [*shared, *summed], cotangents, final)
    for block in blocks[: len(shared)]:
        if block is not None:
            flat = block.reshape(n, -1)
            gramian.addmm_(flat, flat.T)
    return gramian, [None if b is None else b.sum(0) for b in blocks[len(shared) :]]


def _physical(grad: Tensor, n: int) -> Tensor:
    """The (K, *shape) tensor behind a gradient seen inside vmap (broadcast when it does not vary with k)."""
    if not _functorch.is_batchedtensor(grad):
        return grad.unsqueeze(0).expand(n, *grad.shape)
    return _functorch.get_unwrapped(grad).movedim(_functorch.maybe_get_bdim(grad), 0)


def _stand_in(grad: Tensor) -> Tensor:
    """A zero of the gradient's shape that owns one element: what autograd keeps instead of the block."""
    return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)


def _gramian_hook(gramian: Tensor, n: int) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        block = _physical(grad, n).reshape(n, -1)
        gramian.addmm_(block.to(gramian.dtype), block.T.to(gramian.dtype))
        return _stand_in(grad)

    return hook


def _sum_hook(sums: list[Tensor | None], index: int, n: int) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        total = _physical(grad, n).sum(0)
        previous = sums[index]
        sums[index] = total if previous is None else previous + total
        return _stand_in(grad)

    return hook
