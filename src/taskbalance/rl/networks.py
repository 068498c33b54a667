"""The SAC networks: a Gaussian actor and twin Q critics, small ReLU MLPs initialised from a given generator.

Layers are built without PyTorch's default initialisation (which would draw from the global RNG, a side effect
on the user's random stream) and then filled from the agent's own ``torch.Generator`` with the same
distribution PyTorch uses for ``nn.Linear``: weights and biases ~ U(−1/√fan_in, 1/√fan_in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def init_linear_(layer: nn.Linear, generator: torch.Generator, dtype: torch.dtype | None = None) -> None:
    """Fill ``layer`` with U(−1/√fan_in, 1/√fan_in) draws from ``generator`` (PyTorch's default distribution).

    ``dtype``: round the draws to this dtype first, whatever the layer's own dtype (a layer built in float32 and
    moved to float64 is re-initialised to the values its float32 build had); None rounds to the layer's dtype.
    """
    bound = layer.in_features**-0.5
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            draw = torch.rand(p.shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound
            p.copy_(draw if dtype is None else draw.to(dtype))


def uninitialised_linear(in_features: int, out_features: int) -> nn.Linear:
    """An ``nn.Linear`` whose storage is allocated but not initialised (the global RNG is not touched)."""
    return nn.Linear(in_features, out_features, device="meta").to_empty(device="cpu")


def mlp(sizes: Sequence[int], out_activation: bool) -> nn.Sequential:
    """Linear layers between consecutive ``sizes`` with ReLU between them (and after the last if asked).

    The ReLUs work in place on the linear layer's fresh output (its backward needs only its inputs): the same
    values without a new activation tensor per layer, ~5-10% of a SAC update on the CPU. Parameters are left
    uninitialised: call :func:`init_linear_` on every layer.
    """
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(uninitialised_linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or out_activation:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class GaussianActor(nn.Module):
    """state → ReLU MLP → (μ, log σ) of a diagonal Gaussian over the pre-squash action u.

    log σ is clamped to ``log_std_bounds`` (SAC's usual [−20, 2]) so that σ neither vanishes nor explodes.
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        hidden: Sequence[int],
        log_std_bounds: tuple[float, float] = (-20.0, 2.0),
    ) -> None:
        super().__init__()
        self.trunk = mlp([state_dim, *hidden], out_activation=True)
        width = hidden[-1] if hidden else state_dim
        self.mean = uninitialised_linear(width, action_dim)
        self.log_std = uninitialised_linear(width, action_dim)
        self.log_std_bounds = log_std_bounds

    def reset_parameters(self, generator: torch.Generator, dtype: torch.dtype | None = None) -> None:
        for layer in _linears(self):
            init_linear_(layer, generator, dtype)

    def forward(self, state: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(state)
        low, high = self.log_std_bounds
        return self.mean(h), self.log_std(h).clamp(low, high)


class TwinCritic(nn.Module):
    """Two independent Q networks (state ⊕ action) → ReLU MLP → scalar; clipped double-Q takes their minimum."""

    def __init__(self, state_dim: int, action_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        sizes = [state_dim + action_dim, *hidden, 1]
        self.q1 = mlp(sizes, out_activation=False)
        self.q2 = mlp(sizes, out_activation=False)

    def reset_parameters(self, generator: torch.Generator, dtype: torch.dtype | None = None) -> None:
        for layer in _linears(self):
            init_linear_(layer, generator, dtype)

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """(Q1, Q2), each of shape (B,)."""
        sa = torch.cat([state, action], dim=-1)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)
