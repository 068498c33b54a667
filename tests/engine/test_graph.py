"""Graph analysis for the features-first path: what ``leaves_before`` and ``task_split`` see.

``leaves_before`` decides whether features-first is exact; ``task_split`` whether one backward through the heads
can give every ∂ℓ̃_k/∂z (diagonal), a K × K mixing step is needed (ℓ̃ mixes the losses), or the heads must be
run K-batched (no clean split).
"""

from __future__ import annotations

import torch
from torch import nn

from taskbalance.engine.graph import leaves_before, reachable_leaves, task_split
from tests.engine.helpers import heads_model


def test_leaves_before_stops_at_the_features_edge_only() -> None:
    a = nn.Parameter(torch.randn(4))
    b = nn.Parameter(torch.randn(2))
    h = a * 2
    first, second = h.chunk(2)
    out = (first * b).sum() + second.sum()
    assert {id(t) for t in leaves_before(out, first)} == {id(a), id(b)}  # `second` leads to `a` around `first`
    out = (first * b).sum()
    assert [id(t) for t in leaves_before(out, first)] == [id(b)]
    assert {id(t) for t in leaves_before(out, None)} == {id(t) for t in reachable_leaves(out)} == {id(a), id(b)}
    assert [id(t) for t in leaves_before(b * 3, b)] == []  # a leaf as the cut


def test_task_split_separable_and_diagonal() -> None:
    model, x, y = heads_model()
    z, outputs = model(x)
    losses = torch.stack([(o - y[:, k]).pow(2).mean() for k, o in enumerate(outputs)])
    log_var = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    for balanced in (2 * losses, torch.exp(-log_var) * losses.log() + log_var):
        split = task_split(balanced, z, 3)
        assert split is not None
        assert split.diagonal
        assert [len(c) for c in split.consumers] == [1, 1, 1]
    mixing = task_split(losses + 0.1 * losses.sum(), z, 3)
    assert mixing is not None
    assert not mixing.diagonal


def test_task_split_refuses_unclean_graphs() -> None:
    model, x, y = heads_model()
    z, outputs = model(x)
    joined = torch.cat([o[:, None] for o in outputs], dim=1)  # (B, K): one vectorised loss, no stack
    assert task_split((joined - y).pow(2).mean(0), z, 3) is None
    shared_head = model.heads[0](z).squeeze(-1)
    two_from_one = torch.stack([shared_head.pow(2).mean(), shared_head.abs().mean(), outputs[2].pow(2).mean()])
    assert task_split(two_from_one, z, 3) is None  # one consumer of z serves two tasks
    losses = torch.stack([o.pow(2).mean() for o in outputs])
    assert task_split(losses + z.mean(), z, 3) is None  # z reaches ℓ̃ around the stack
    assert task_split(losses, z.detach(), 3) is None
