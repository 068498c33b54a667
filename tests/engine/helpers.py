"""Test-local gradient methods and models shared by the engine's tests, and one engine step on them.

Three models: an MLP, a small CNN with BatchNorm in train mode, and a model whose heads share nothing but where
head 0 also reads a shared parameter directly (features-first is then not exact and must be refused). Two
methods: fixed weights (reads G) and an explicit direction that is not of the form Jᵀw (reads J).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal, TypedDict, cast

import torch
from torch import Tensor, nn

from taskbalance.engine import Engine
from taskbalance.gradient_balancing.base import Combination, GradientBalancer


# -- test-local methods ------------------------------------------------------------------------------------------
class FixedWeights(GradientBalancer):
    """Reads G, returns the given weights; records what it was given."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def __init__(self, weights: Tensor, max_norm: float | None = None) -> None:
        super().__init__(max_norm)
        self.weights = weights
        self.seen: Tensor | None = None

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        self.seen = matrix.detach().clone()
        return Combination(weights=self.weights.to(matrix))


class ExplicitDirection(GradientBalancer):
    """Reads J, returns d = Σ_k c_k g_k + 0.1·Σ_k g_k², a direction that no weights give (and sensitive to J)."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__(max_norm)
        self.seen: Tensor | None = None

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        self.seen = matrix.detach().clone()
        c = torch.linspace(0.5, 1.5, matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return Combination(direction=c @ matrix + 0.1 * matrix.pow(2).sum(0))


# -- test-local models: forward(x) -> (features z, K per-task outputs) -------------------------------------------
class MLP(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


class SmallCNN(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x.reshape(x.shape[0], 2, 4, 4))
        return z, [head(z).squeeze(-1) for head in self.heads]


class DirectUse(nn.Module):
    """Disjoint heads on z, but head 0 also reads the first trunk weight directly (a path around z)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(32, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        outputs = [head(z).squeeze(-1) for head in self.heads]
        outputs[0] = outputs[0] + 0.5 * torch.tanh(x @ cast(nn.Linear, self.trunk[0]).weight[0])
        return z, outputs


MODELS: dict[str, Callable[[int], nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "direct": DirectUse}


def setup(name: str, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = MODELS[name](k).to(dtype).train()
    gen = torch.Generator().manual_seed(seed + 1)
    d_in = 5 if name == "mlp" else 32
    x = torch.randn(8, d_in, generator=gen, dtype=dtype)
    y = torch.randn(8, k, generator=gen, dtype=dtype)
    return model, x, y


def balanced_losses(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(z, ℓ̃) with ℓ̃_k = (k+1)/K · MSE_k: unequal task scales, as a loss method would produce."""
    z, outputs = model(x)
    losses = torch.stack([(out - y[:, k]).pow(2).mean() for k, out in enumerate(outputs)])
    scale = torch.arange(1, len(outputs) + 1, dtype=losses.dtype) / len(outputs)
    return z, scale * losses


def shared_and_heads(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    return list(model.trunk.parameters()), list(model.heads.parameters())  # type: ignore[union-attr]


def run(
    model: nn.Module, x: Tensor, y: Tensor, method: GradientBalancer, path: str, engine: Engine | None = None
) -> list[Tensor]:
    """One engine step from zeroed gradients; every parameter's .grad (zeros where None)."""
    model.zero_grad(set_to_none=True)
    z, balanced = balanced_losses(model, x, y)
    shared, heads = shared_and_heads(model)
    (engine if engine is not None else Engine(path))(balanced, shared, heads, method, z)  # type: ignore[arg-type]
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def make_method(
    kind: str, k: int, dtype: torch.dtype, max_norm: float | None = None
) -> FixedWeights | ExplicitDirection:
    """A set-up test-local method; typed as the concrete classes so that ``.seen`` keeps its type."""
    if kind == "weights":
        method: FixedWeights | ExplicitDirection = FixedWeights(torch.linspace(-0.5, 2.0, k, dtype=dtype), max_norm)
    else:
        method = ExplicitDirection(max_norm)
    method.setup(k)
    return method


class Tolerances(TypedDict):
    """Keyword tolerances for ``torch.testing.assert_close`` (a TypedDict, so ``**`` splats type-check)."""

    rtol: float
    atol: float


def tolerances(dtype: torch.dtype) -> Tolerances:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}


def heads_model(k: int = 3) -> tuple[MLP, Tensor, Tensor]:
    """The MLP in float64 (seed 0) and a batch of 8."""
    torch.manual_seed(0)
    model = MLP(k).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randn(8, k, dtype=torch.float64)
    return model, x, y
