"""The head-phase variants of the features-first path (:mod:`taskbalance.engine.heads`) each give the loop's
gradients: one backward through the heads (diagonal), a K × K mixing step, or the heads run K-batched.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from taskbalance.engine import Engine, EnginePath
from tests.engine.helpers import MLP, FixedWeights, heads_model, make_method, tolerances

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
        Engine(engine_path)(balanced, list(model.trunk.parameters()), list(model.heads.parameters()), method, z)
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
