"""Graph analysis for the features-first path, and the head-phase variants it selects.

``leaves_before`` decides whether features-first is exact; ``task_split`` whether one backward through the heads
can give every ∂ℓ̃_k/∂z (diagonal), a K × K mixing step is needed (ℓ̃ mixes the losses), or the heads must be
run K-batched (no clean split). Each variant must give the loop's gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from taskbalance._graph import leaves_before, reachable_leaves, task_split
from taskbalance.jacobian import Engine, EnginePath, apply_gradient_method
from tests.test_jacobian import MLP, FixedWeights, make_method, tolerances


def heads_model(k: int = 3) -> tuple[MLP, Tensor, Tensor]:
    torch.manual_seed(0)
    model = MLP(k).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randn(8, k, dtype=torch.float64)
    return model, x, y


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


LossVariant = Callable[[MLP, Tensor, Tensor], tuple[Tensor, Tensor]]


def separable_diagonal(model: MLP, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    z, outputs = model(x)
    losses = torch.stack([(o - y[:, k]).pow(2).mean() for k, o in enumerate(outputs)])
    return z, torch.log(losses) * torch.tensor([1.0, 2.0, 0.5], dtype=losses.dtype)


def separable_mixing(model: MLP, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    z, outputs = model(x)
    losses = torch.stack([(o - y[:, k]).pow(2).mean() for k, o in enumerate(outputs)])
    return z, torch.softmax(losses, 0) * losses + 0.1 * losses.sum()


def vectorised(model: MLP, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """A stack of the K head outputs (B, K), then one reduction: the stack found is not one of K scalars."""
    z, outputs = model(x)
    return z, (torch.stack(outputs, dim=1) - y).pow(2).mean(0)


def shared_consumer(model: MLP, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    z, _ = model(x)
    squashed = torch.tanh(z)  # one node reads z for all tasks
    losses = [(head(squashed).squeeze(-1) - y[:, k]).pow(2).mean() for k, head in enumerate(model.heads)]
    return z, torch.stack(losses)


@pytest.mark.parametrize("variant", [separable_diagonal, separable_mixing, vectorised, shared_consumer])
@pytest.mark.parametrize("path", ["features", "gramian", "representation"])
def test_every_head_phase_matches_the_loop(variant: LossVariant, path: EnginePath) -> None:
    model, x, y = heads_model()
    method = make_method("weights", 3, torch.float64)
    results = []
    engine_paths: tuple[EnginePath, ...] = ("loop", path)
    for engine_path in engine_paths:
        model.zero_grad(set_to_none=True)
        z, balanced = variant(model, x, y)
        apply_gradient_method(
            balanced, list(model.trunk.parameters()), list(model.heads.parameters()), method, z, engine_path
        )
        results.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
    # with fixed weights the representation update Σ_k w_k ∂ℓ̃_k/∂z through the trunk is exact too
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, **tolerances(torch.float64))


def test_trunk_side_task_parameters_get_the_plain_gradient() -> None:
    """A trunk parameter left out of `shared` is a task parameter behind z: it gets ∇ Σ ℓ̃ on every path."""
    model, x, y = heads_model()
    first, *rest = list(model.trunk.parameters())
    others = [first, *model.heads.parameters()]
    method = FixedWeights(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    method.setup(3)
    model.zero_grad(set_to_none=True)
    z, balanced = separable_diagonal(model, x, y)
    expected = torch.autograd.grad(balanced.sum(), first, retain_graph=True)[0]
    reference = None
    for path in ("loop", "batched", "features", "gramian", "representation"):
        model.zero_grad(set_to_none=True)
        z, balanced = separable_diagonal(model, x, y)
        engine = Engine(path)  # type: ignore[arg-type]
        engine(balanced, rest, others, method, z)
        assert first.grad is not None
        torch.testing.assert_close(first.grad, expected)
        grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        if reference is None:
            reference = grads
        for got, want in zip(grads, reference, strict=True):
            torch.testing.assert_close(got, want, **tolerances(torch.float64))
