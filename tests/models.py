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
