"""Exact gradient accumulation: N micro-batches balanced as one batch (``Balancer.backward(..., accumulate=True)``).

With micro-batch losses L^(i) given as batch means, the whole batch's loss is L = (1/N) Σ_i L^(i) and its
per-task Jacobian is J_L = (1/N) Σ_i J_L^(i), J_L^(i) = ∂L^(i)/∂(θ, heads). A balancer that ran on every
micro-batch would apply its loss method N times (N state updates, N different chain-rule factors) and solve N
problems; the mean of N solutions is not the solution of the mean. So a micro-batch only records (L^(i),
J_L^(i)) into :class:`MicroBatches` and writes nothing. The last call adds its own and balances the whole batch:

    ℓ̃ = loss_method(L)               (once; its state advances once)
    D = ∂ℓ̃/∂L  (K × K, through the loss method alone; diagonal for most methods)
    J = D · J_L                       (the per-task gradients of ℓ̃, the chain-rule factor applied once)
    θ.grad += gradient_method(J);  heads.grad += 1ᵀ D · J_L,heads;  loss method's own parameters: ∇ Σ ℓ̃

which is the same, to rounding, as one call on the concatenated batch. Memory: the sums of J_L, K × (P + P_heads)
floats, held from the first micro-batch to the last. Time: K products per micro-batch (the per-task gradients
of the raw losses), like a gradient method's step, whatever the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class MicroBatches:
    """What the micro-batches of one optimizer step have recorded so far: sums of L^(i) and of J_L^(i)."""

    def __init__(self) -> None:
        self.count = 0
        self.loss_sum: Tensor | None = None
        self.blocks: list[Tensor] = []
        self.inputs: tuple[int, ...] = ()
        self.finite = True
        self.features: list[Tensor] = []

    def clear(self) -> None:
        """Drop the recorded micro-batches (after the step that balanced them, or on request)."""
        self.count, self.loss_sum, self.blocks, self.inputs, self.finite = 0, None, [], (), True
        self.features = []

    @property
    def pending(self) -> bool:
        """Whether micro-batches wait for the last call of the step."""
        return self.count > 0

    def check_inputs(self, inputs: Sequence[Tensor]) -> None:
        """Refuse a micro-batch that differentiates other parameters than the ones before it."""
        if self.pending and tuple(id(p) for p in inputs) != self.inputs:
            raise ValueError(
                "this micro-batch's losses depend on other parameters (or other shared_params were passed) than "
                "the earlier micro-batches of this step: accumulate micro-batches of one model with the same "
                "shared_params, or call reset_accumulation() to drop the pending ones"
            )

    def totals(
        self, losses: Tensor, blocks: Sequence[Tensor], features: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """The whole batch's mean losses, mean J_L and feature Jacobian with the last micro-batch (new tensors;
        nothing recorded). The whole batch's J_z holds each micro-batch's columns divided by N: its features are
        the micro-batches' side by side, and its loss is their mean."""
        n = self.count + 1
        represented = None if features is None else torch.cat([*self.features, features], dim=1) / n
        if not self.pending:
            return losses.detach().clone(), list(blocks), represented
        assert self.loss_sum is not None
        mean_losses = (self.loss_sum + losses.detach()) / n
        totals = [(total + block) / n for total, block in zip(self.blocks, blocks, strict=True)]
        return mean_losses, totals, represented

    def record(
        self,
        losses: Tensor,
        blocks: Sequence[Tensor],
        inputs: Sequence[Tensor],
        finite: bool,
        features: Tensor | None = None,
    ) -> None:
        """Add one micro-batch (not the last); ``finite`` False marks the whole step to be skipped. ``features``:
        the per-task gradients of the raw losses w.r.t. the flattened features (K × B_i·d), for the
        representation path (MGDA-UB), which reads them instead of J."""
        if features is not None:
            self.features.append(features)
        if not self.pending:
            self.loss_sum = losses.detach().clone()
            self.blocks = [block.clone() for block in blocks]
            self.inputs = tuple(id(p) for p in inputs)
        else:
            assert self.loss_sum is not None
            self.loss_sum += losses.detach()
            for total, block in zip(self.blocks, blocks, strict=True):
                total += block
        self.count += 1
        self.finite = self.finite and finite


def loss_jacobian(balanced: Tensor, losses: Tensor) -> Tensor:
    """D = ∂ℓ̃/∂L (K × K) of the loss method's graph from the leaf ``losses`` to ``balanced`` (K calls of a tiny
    backward), keeping the graph for the gradients of the method's own parameters."""
    n = balanced.shape[0]
    rows = []
    for k in range(n):
        (row,) = torch.autograd.grad(balanced[k], losses, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(losses) if row is None else row)
    return torch.stack(rows)


def chained(
    chain: Tensor, totals: Sequence[Tensor], n_shared: int, scale: float = 1.0
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """The whole batch's per-task blocks of ℓ̃ for the shared parameters, D · J_L (K, *p.shape), and the heads'
    gradients of Σ_k ℓ̃_k, 1ᵀD · J_L, from the mean J_L blocks (shared first); times the loss scale s."""
    n = chain.shape[0]
    column = chain.sum(0)

    def product(left: Tensor, block: Tensor, shape: torch.Size) -> Tensor:
        out = (left.to(block.dtype) @ block.reshape(n, -1)).view(shape)
        return out if scale == 1.0 else out * scale

    shared: list[Tensor | None] = [product(chain, b, b.shape) for b in totals[:n_shared]]
    heads: list[Tensor | None] = [product(column, b, b.shape[1:]) for b in totals[n_shared:]]
    return shared, heads
