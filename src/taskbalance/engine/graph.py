"""Inspection of the autograd graph: which leaf tensors a loss depends on, and how it depends on ``features``.

The Balancer needs this to refuse a shared parameter that the losses do not depend on (a clear error instead
of a silent zero gradient); the engine to find the task-specific parameters (heads, and loss methods' own
parameters), which must receive ∇ Σ_k ℓ̃_k while the shared ones receive the balanced update.

The features-first path is exact only when every path from the shared parameters to ℓ̃ goes through
``features`` (:class:`FeatureCut`, by :func:`leaves_before`), and it is cheapest when each consumer of ``features``
serves one task alone (:func:`task_split`), because then one ordinary backward through the heads yields every
∂L_k/∂z at once instead of K backward passes (or a K-batched one) through all heads.

All walks visit each node at most once per start node and read only ``grad_fn.next_functions`` (a few µs per
hundred nodes); nothing is computed on tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

#: an edge of the autograd graph: (node, index of the node's output) as in ``Node.next_functions``
Edge = tuple[Any, int]


def reachable_leaves(output: Tensor) -> list[Tensor]:
    """Leaf tensors requiring grad that ``output`` depends on, in discovery order, without duplicates."""
    return leaves_before(output, None)


def edge_of(tensor: Tensor) -> Edge | None:
    """The graph edge through which gradients reach ``tensor`` (None for a tensor outside any graph)."""
    return None if tensor.grad_fn is None else (tensor.grad_fn, tensor.output_nr)


def leaves_before(output: Tensor, cut: Tensor | None) -> list[Tensor]:
    """Leaf tensors requiring grad that ``output`` reaches by paths that do not pass through ``cut``.

    The walk stops at the edge into ``cut`` (its ``grad_fn`` and output index), not at the node: another output
    of the same node (``a, b = x.chunk(2)``, ``cut = a``) is walked through, because gradients reaching ``b`` do
    not pass through ``cut``. With ``cut=None`` every leaf is returned.
    """
    root = output.grad_fn
    if root is None:
        return [output] if output.requires_grad and output is not cut else []
    stop = None if cut is None else edge_of(cut)
    stop_leaf = cut if cut is not None and cut.grad_fn is None else None
    leaves: list[Tensor] = []
    seen_leaves: set[int] = set()
    seen_nodes = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            if variable is not stop_leaf and id(variable) not in seen_leaves:
                seen_leaves.add(id(variable))
                leaves.append(variable)
            continue
        for child, index in node.next_functions:
            if child is None or child in seen_nodes:
                continue
            if stop is not None and child is stop[0] and index == stop[1]:
                continue
            seen_nodes.add(child)
            stack.append(child)
    return leaves


def through_compiled(output: Tensor) -> bool:
    """Whether the backward graph of ``output`` runs through a node of ``torch.compile`` (one opaque node for
    everything it compiled: a cut inside it, such as features between a compiled trunk and compiled heads, cannot
    be seen)."""
    seen: set[int] = set()
    stack = [] if output.grad_fn is None else [output.grad_fn]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if "CompiledFunction" in node.name():
            return True
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return False


class FeatureCut:
    """θ, the other leaves, and how they sit around ``features`` z (which leaves ℓ̃ reaches without z)."""

    def __init__(
        self, balanced: Tensor, features: Tensor | None, shared: Sequence[Tensor], task_params: Sequence[Tensor]
    ) -> None:
        self.head_side: list[Tensor] = []
        self.trunk_side: list[Tensor] = []
        self.reason = ""
        if features is None:
            self.reason = "no features were given"
            return
        if features.grad_fn is None:
            self.reason = "features are not the output of a differentiable computation (no grad_fn)"
            return
        direct = {id(t) for t in leaves_before(balanced, features)}
        bypass = [i for i, p in enumerate(shared) if id(p) in direct]
        if bypass:
            self.reason = f"shared parameters at positions {bypass} reach the losses without passing through features"
            return
        self.head_side = [p for p in task_params if id(p) in direct]
        self.trunk_side = [p for p in task_params if id(p) not in direct]

    @property
    def exact(self) -> bool:
        """Whether J = J_z · ∂z/∂θ holds (every path from θ to ℓ̃ goes through z)."""
        return not self.reason


@dataclass(frozen=True)
class TaskSplit:
    """Where the K task losses part in the graph of ℓ̃, seen from ``features`` z.

    Attributes:
        stack: the ``StackBackward0`` node that assembled the K raw losses L (ℓ̃ reaches z only through it).
        consumers: for each task k, the nodes that read z on behalf of task k alone, each with the indices of
            its inputs that are z (a node may read z twice, e.g. ``z * z``).
        diagonal: ℓ̃_k depends on L_k alone (only elementwise ops between the stack and ℓ̃), so that
            ∂ℓ̃/∂L is diagonal and a backward of Σ_k ℓ̃_k sends each consumer exactly ∂ℓ̃_k/∂z of its task.
    """

    stack: Any
    consumers: list[list[tuple[Any, list[int]]]]
    diagonal: bool


def task_split(balanced: Tensor, features: Tensor, n_tasks: int) -> TaskSplit | None:
    """The per-task consumers of ``features`` when the graph separates the tasks cleanly, else None.

    Clean means: ℓ̃ reaches z only through one ``torch.stack`` of K inputs (the raw losses), and no node that
    reads z is reached from two of those inputs. Then a backward of Σ_k L_k with a hook on each consumer gives
    every ∂L_k/∂z separately. Anything else (a loss tensor made by one vectorised op, a head shared by tasks, z
    used in the loss method itself) returns None and the engine uses a K-batched backward through the heads.
    """
    z_edge = edge_of(features)
    root = balanced.grad_fn
    if z_edge is None or root is None:
        return None
    stack = _find_stack(root, n_tasks)
    if stack is None or _reaches_edge(root, z_edge, avoid=stack):
        return None
    owner: dict[Any, int] = {}
    consumers: list[list[tuple[Any, list[int]]]] = []
    for k, (start, index) in enumerate(stack.next_functions):
        if start is z_edge[0] and index == z_edge[1]:
            return None
        found: list[tuple[Any, list[int]]] = []
        for node in _consumers_below(start, z_edge):
            if owner.setdefault(node, k) != k:
                return None
            slots = [i for i, (c, nr) in enumerate(node.next_functions) if c is z_edge[0] and nr == z_edge[1]]
            found.append((node, slots))
        consumers.append(found)
    return TaskSplit(stack=stack, consumers=consumers, diagonal=_elementwise_above(root, stack))


#: backward nodes of ops whose output k depends on the inputs' entry k alone (same-shape operands)
_ELEMENTWISE = frozenset(
    f"{name}Backward{i}"
    for name in (
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Log",
        "Log1p",
        "Exp",
        "Pow",
        "Sqrt",
        "Rsqrt",
        "Reciprocal",
        "Abs",
        "Clamp",
        "ClampMin",
        "ClampMax",
        "Tanh",
        "Sigmoid",
        "Softplus",
        "Clone",
        "ToCopy",
        "Alias",
    )
    for i in range(3)
)


def _elementwise_above(root: Any, stack: Any) -> bool:
    """Whether every node between ``root`` (ℓ̃) and ``stack`` is elementwise (conservative: a branch that only
    reaches a loss method's own parameters must be elementwise too, leaves excepted)."""
    seen = {root}
    pending = [root]
    while pending:
        node = pending.pop()
        if getattr(node, "variable", None) is not None:
            continue
        if node.name() not in _ELEMENTWISE:
            return False
        for child, _ in node.next_functions:
            if child is not None and child is not stack and child not in seen:
                seen.add(child)
                pending.append(child)
    return True


def _find_stack(root: Any, n_tasks: int) -> Any:
    """The first ``StackBackward0`` node with ``n_tasks`` inputs found breadth-first from ``root``, or None."""
    queue = [root]
    seen = {root}
    for node in queue:  # the list grows while it is read: breadth-first
        if node.name() == "StackBackward0" and len(node.next_functions) == n_tasks:
            return node
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                queue.append(child)
    return None


def _reaches_edge(root: Any, target: Edge, avoid: Any) -> bool:
    """Whether a walk from ``root`` that never enters ``avoid`` crosses the edge ``target``."""
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        for child, index in node.next_functions:
            if child is target[0] and index == target[1]:
                return True
            if child is not None and child is not avoid and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


def _consumers_below(start: Any, target: Edge) -> list[Any]:
    """Nodes reachable from ``start`` (without crossing ``target``) that have ``target`` among their inputs."""
    if start is None:
        return []
    found: list[Any] = []
    seen = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        reads_target = False
        for child, index in node.next_functions:
            if child is target[0] and index == target[1]:
                reads_target = True
            elif child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
        if reads_target:
            found.append(node)
    return found
