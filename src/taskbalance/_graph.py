"""Inspection of the autograd graph: which leaf tensors a loss depends on.

The Balancer needs this for two things: to refuse a shared parameter that the losses do not depend on (a
clear error instead of a silent zero gradient), and to find the task-specific parameters (heads), which must
receive ∇ Σ_k ℓ̃_k while the shared ones receive the balanced update.
"""

from __future__ import annotations

from torch import Tensor


def reachable_leaves(output: Tensor) -> list[Tensor]:
    """Leaf tensors requiring grad that ``output`` depends on, in discovery order, without duplicates.

    A plain walk over ``grad_fn.next_functions``; it visits each node once (a few µs per hundred nodes).
    """
    root = output.grad_fn
    if root is None:
        return [output] if output.requires_grad else []
    leaves: list[Tensor] = []
    seen_leaves: set[int] = set()
    seen_nodes = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in seen_leaves:
                seen_leaves.add(id(variable))
                leaves.append(variable)
            continue
        for child, _ in node.next_functions:
            if child is not None and child not in seen_nodes:
                seen_nodes.add(child)
                stack.append(child)
    return leaves
