"""The models the speed benchmark times: each a shared encoder, K heads, one fixed batch on a device.

- ``multilenet``: MultiLeNet on 28×28 images (MultiMNIST resized, as in the papers), batch 256, K = 2 (the MTL
  papers' MNIST model).
- ``cnn``: two 3×3 convolutions (32, 64 channels) with BatchNorm in train mode on 32×32 RGB, batch 64, K = 3
  (BatchNorm couples the samples of a batch, which per-sample tricks must respect).
- ``qm9``: the QM9 MPNN (NNConv/GRU/Set2Set, :mod:`taskbalance.benchmarks.models.mpnn`) on 8 synthetic molecules of
  QM9's size (9-29 atoms, complete graphs), K = 11. Synthetic because timing does not depend on the chemistry and
  the real graphs take minutes to build; needs torch_geometric (the ``[qm9]`` extra).
- ``mlp40``: an MLP trunk 512→1024→1024→512 on CelebA-like feature vectors, batch 128, 40 linear heads (K = 40).

Every case returns (features, [L_1, ..., L_K]) from ``losses(model)``: features are the encoder's output, so
that the engine can take its features-first path and the representation-level methods have something to read;
the losses stay separate scalars so that torchjd's ``mtl_backward`` sees which head belongs to which task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..benchmarks.models.multilenet import MultiLeNet

CASE_NAMES = ("multilenet", "cnn", "qm9", "mlp40")


class HeadsModel(nn.Module):
    """``.encoder`` and ``.heads`` (a ModuleList), ``forward(x) -> (features, [output_k])``."""

    def __init__(self, encoder: nn.Module, heads: list[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(heads)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features: Tensor = self.encoder(x)
        return features, [head(features) for head in self.heads]


@dataclass
class SpeedCase:
    """One timed model: ``model`` (with ``.encoder`` and ``.heads``) and ``losses(model) -> (features, K losses)``."""

    name: str
    description: str
    n_tasks: int
    model: nn.Module
    losses: Callable[[nn.Module], tuple[Tensor, list[Tensor]]]


def _classification(inputs: Tensor, labels: Tensor) -> Callable[[nn.Module], tuple[Tensor, list[Tensor]]]:
    def losses(model: nn.Module) -> tuple[Tensor, list[Tensor]]:
        features, outputs = model(inputs)
        return features, [F.cross_entropy(out, labels[:, k]) for k, out in enumerate(outputs)]

    return losses


def _regression(inputs: object, targets: Tensor) -> Callable[[nn.Module], tuple[Tensor, list[Tensor]]]:
    def losses(model: nn.Module) -> tuple[Tensor, list[Tensor]]:
        features, outputs = model(inputs)
        return features, [F.mse_loss(out.squeeze(-1), targets[:, k]) for k, out in enumerate(outputs)]

    return losses


def multilenet(device: torch.device, gen: torch.Generator) -> SpeedCase:
    model = MultiLeNet(n_tasks=2, dropout=0.0).to(device)  # dropout off: every step does the same work
    x = torch.randn(256, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (256, 2), generator=gen).to(device)
    return SpeedCase("multilenet", "MultiLeNet, 28×28, batch 256", 2, model, _classification(x, y))


def cnn(device: torch.device, gen: torch.Generator) -> SpeedCase:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    encoder = nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heads: list[nn.Module] = [nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)) for _ in range(3)]
    model = HeadsModel(encoder, heads).to(device).train()
    x = torch.randn(64, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (64, 3), generator=gen).to(device)
    return SpeedCase("cnn", "CNN + BatchNorm, 32×32, batch 64", 3, model, _classification(x, y))


def qm9(device: torch.device, gen: torch.Generator) -> SpeedCase:
    from ..benchmarks.datasets.qm9 import N_EDGE_FEATURES, N_NODE_FEATURES, QM9Graphs
    from ..benchmarks.models.mpnn import QM9Net

    counts = torch.randint(9, 30, (8,), generator=gen)
    batch = torch.arange(8).repeat_interleave(counts)
    offsets = torch.cumsum(counts, 0) - counts
    rows, cols = [], []
    for offset, n in zip(offsets.tolist(), counts.tolist(), strict=True):
        local = torch.arange(n)
        source, target = local.repeat_interleave(n), local.repeat(n)
        keep = source != target
        rows.append(source[keep] + offset)
        cols.append(target[keep] + offset)
    edge_index = torch.stack([torch.cat(rows), torch.cat(cols)])
    graphs = QM9Graphs(
        x=torch.randn(int(counts.sum()), N_NODE_FEATURES, generator=gen),
        edge_index=edge_index,
        edge_attr=torch.rand(edge_index.shape[1], N_EDGE_FEATURES, generator=gen),
        batch=batch,
        num_graphs=8,
    ).to(device)
    targets = torch.randn(8, 11, generator=gen).to(device)
    model = QM9Net(n_tasks=11).to(device)
    return SpeedCase("qm9", "QM9 MPNN, 8 molecules (synthetic)", 11, model, _regression(graphs, targets))


def mlp40(device: torch.device, gen: torch.Generator) -> SpeedCase:
    encoder = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU()
    )
    model = HeadsModel(encoder, [nn.Linear(512, 1) for _ in range(40)]).to(device)
    x = torch.randn(128, 512, generator=gen).to(device)
    y = torch.randn(128, 40, generator=gen).to(device)
    return SpeedCase("mlp40", "MLP trunk, 40 heads, batch 128", 40, model, _regression(x, y))


BUILDERS: dict[str, Callable[[torch.device, torch.Generator], SpeedCase]] = {
    "multilenet": multilenet,
    "cnn": cnn,
    "qm9": qm9,
    "mlp40": mlp40,
}


def build(name: str, device: torch.device) -> SpeedCase:
    """The case ``name`` with its model and batch on ``device`` (seeded: every build is the same)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown speed case {name!r}; choose from {', '.join(CASE_NAMES)}")
    torch.manual_seed(0)
    return BUILDERS[name](device, torch.Generator().manual_seed(0))
