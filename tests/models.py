"""Tiny multi-task models and data for the tests (generated here, nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyMTL(nn.Module):
    """An MLP trunk with K linear heads: encoder(x) -> features -> head_k(features) (regression)."""

    def __init__(self, n_tasks: int = 3, d_in: int = 5, d_hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(d_hidden, 1) for _ in range(n_tasks))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.encoder(x)
        return features, [head(features).squeeze(-1) for head in self.heads]


def task_losses(model: TinyMTL, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(features, losses) with losses[k] = MSE of head k against y[:, k], plus a per-task scale k+1."""
    features, outputs = model(x)
    losses = torch.stack([(k + 1.0) * (out - y[:, k]).pow(2).mean() for k, out in enumerate(outputs)])
    return features, losses


def make_data(n_tasks: int = 3, n: int = 32, d_in: int = 5, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen), torch.randn(n, n_tasks, generator=gen)


_GEN = torch.Generator().manual_seed(0)
#: the issue's degenerate Jacobians (K × P), shared by every gradient method's test: zero gradients, one zero
#: gradient, parallel, opposite, one gradient 1e6 times longer, K = 1, K = 40 (> P), float64
DEGENERATE_JACOBIANS: dict[str, Tensor] = {
    "zero": torch.zeros(3, 5),
    "one-zero": torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]]),
    "parallel": torch.tensor([[1.0, 2.0], [2.0, 4.0]]),
    "opposite": torch.tensor([[1.0, 2.0], [-1.0, -2.0]]),
    "one-1e6-longer": torch.tensor([[1e6, 2e6, 0.0], [-1.0, 0.5, 1.0]]),
    "k1": torch.randn(1, 4, generator=_GEN),
    "k40": torch.randn(40, 7, generator=_GEN),
    "float64": torch.randn(3, 5, generator=_GEN, dtype=torch.float64),
}
