"""Writes into .grad: accumulation like backward(), clipping of the shared update only, no shared memory."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch
from torch import Tensor, nn

from taskbalance.engine import Engine
from taskbalance.engine.grad import clip_update
from taskbalance.gradient_balancing.base import Combination, GradientBalancer
from tests.engine.helpers import balanced_losses, make_method, run, setup, shared_and_heads


def test_gradients_accumulate_into_existing_grad() -> None:
    model, x, y = setup("mlp", 3, torch.float64)
    method = make_method("direction", 3, torch.float64)
    step = run(model, x, y, method, "loop")
    for path in ("loop", "batched", "features", "representation"):
        previous = [torch.full_like(p, 0.25) for p in model.parameters()]
        for p, g in zip(model.parameters(), previous, strict=True):
            p.grad = g.clone()
        z, balanced = balanced_losses(model, x, y)
        shared, heads = shared_and_heads(model)
        Engine(path)(balanced, shared, heads, method, z)  # type: ignore[arg-type]
        if path == "representation":  # a different shared update, same head update
            for head, g, s in zip(heads, previous[len(shared) :], step[len(shared) :], strict=True):
                torch.testing.assert_close(head.grad, g + s)
            continue
        for p, g, s in zip(model.parameters(), previous, step, strict=True):
            torch.testing.assert_close(p.grad, g + s)
    weights = make_method("weights", 3, torch.float64)
    step = run(model, x, y, weights, "loop")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    z, balanced = balanced_losses(model, x, y)
    Engine("gramian")(balanced, *shared_and_heads(model), weights, z)
    for p, s in zip(model.parameters(), step, strict=True):
        torch.testing.assert_close(p.grad, 1 + s)


@pytest.mark.parametrize(
    ("path", "kind"),
    [(p, "weights") for p in ("loop", "batched", "features", "gramian", "representation")]
    + [(p, "direction") for p in ("loop", "batched", "features", "representation")],
)
def test_clipping_bounds_the_shared_update_only(path: str, kind: str) -> None:
    model, x, y = setup("mlp", 4, torch.float64)
    free = run(model, x, y, make_method(kind, 4, torch.float64), path)
    clipped = run(model, x, y, make_method(kind, 4, torch.float64, max_norm=1e-3), path)
    loose = run(model, x, y, make_method(kind, 4, torch.float64, max_norm=1e6), path)
    n_shared = len(shared_and_heads(model)[0])
    free_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in free[:n_shared]]))
    clipped_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped[:n_shared]]))
    assert free_norm > 1e-2
    torch.testing.assert_close(clipped_norm, torch.tensor(1e-3, dtype=torch.float64))
    for a, b in zip(clipped[:n_shared], free[:n_shared], strict=True):  # same direction
        torch.testing.assert_close(a, b * (1e-3 / free_norm))
    for a, b in zip(clipped[n_shared:], free[n_shared:], strict=True):  # heads untouched
        torch.testing.assert_close(a, b)
    for a, b in zip(loose, free, strict=True):
        torch.testing.assert_close(a, b)


def test_clip_update() -> None:
    update = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(clip_update(update, 1.0), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(clip_update(update, 10.0), update)
    assert clip_update(update, None) is update


class StatefulDirection(GradientBalancer):
    """Returns its own buffer as the direction (as EMA-based methods may)."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        self.state = matrix.sum(0)
        return Combination(direction=self.state)


class TwinBias(nn.Module):
    """Head outputs + c1 + c2 with c1, c2 of the output's shape: autograd hands both the same gradient tensor."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k))
        self.c1 = nn.Parameter(torch.zeros(8))
        self.c2 = nn.Parameter(torch.zeros(8))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) + self.c1 + self.c2 for head in self.heads]


@pytest.mark.parametrize("path", ["loop", "batched", "features", "gramian", "representation"])
def test_new_grads_share_memory_with_nothing(path: str) -> None:
    """In-place work on one .grad (clipping, zero_grad(set_to_none=False)) must not reach another or a method."""
    torch.manual_seed(0)
    model = TwinBias(2).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    z, balanced = balanced_losses(model, x, y)
    method = StatefulDirection() if path != "gramian" else make_method("weights", 2, torch.float64)
    method.setup(2)
    others = [*model.heads.parameters(), model.c1, model.c2]
    Engine(path)(balanced, list(model.trunk.parameters()), others, method, z)  # type: ignore[arg-type]
    pointers = [p.grad.untyped_storage().data_ptr() for p in model.parameters()]  # type: ignore[union-attr]
    assert len(set(pointers)) == len(pointers)
    if isinstance(method, StatefulDirection) and path != "representation":
        state = method.state.clone()
        for p in model.trunk.parameters():
            p.grad.zero_()  # type: ignore[union-attr]
        torch.testing.assert_close(method.state, state)
