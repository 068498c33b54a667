"""The standard MTL QM9 model: an MPNN encoder (NNConv + GRU, Set2Set readout) and one linear head per target.

Gilmer et al., "Neural Message Passing for Quantum Chemistry" (ICML 2017, arXiv 1704.01212), in the form
torch_geometric's QM9 example and the MTL papers (Nash-MTL, Navon et al., ICML 2022, arXiv 2202.01017; FAMO; IGB)
use:

    h⁰ = ReLU(W₀ x)                                        x: 11 node features → 64
    3 × { m = ReLU(NNConv(h, e)),  h = GRU(m, h) }          NNConv: edge network Linear(5,128)-ReLU-Linear(128, 64·64),
                                                           mean aggregation over incoming edges, one shared weight set
    z = ReLU(W₁ Set2Set(h))                                Set2Set with 3 processing steps → 128 → 64 (the features)
    ŷ_k = w_kᵀ z + b_k                                     one Linear(64, 1) head per target

Needs torch_geometric (``pip install 'taskbalance[qm9]'``) for Set2Set. ``.encoder`` maps a :class:`QM9Graphs`
batch to the (B, 64) features the Balancer's representation-level methods use; ``.heads`` are the 11 linear heads.

Deliberate difference: the three message-passing steps share one NNConv, whose per-edge 64×64 matrices depend only
on the edge features, yet torch_geometric's ``NNConv`` recomputes them (a Linear(128, 4096) over every edge of the
complete graphs, ≈ 39k edges at batch 120) at each step. :class:`EdgeConditionedConv` computes them once per
forward and reuses them: the same function, parameters (named as ``NNConv``'s, so its state_dict loads) and
gradients, with a third of the edge-network cost, which dominates a step on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..datasets.qm9 import N_EDGE_FEATURES, N_NODE_FEATURES, QM9Graphs

try:
    from torch_geometric.nn import Set2Set  # type: ignore[import-untyped]
except ImportError as _error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the QM9 model needs torch_geometric: pip install 'taskbalance[qm9]' (or pip install torch_geometric)"
    ) from _error

MESSAGE_STEPS = 3
SET2SET_STEPS = 3


class EdgeConditionedConv(nn.Module):
    """torch_geometric's ``NNConv(dim, dim, nn, aggr="mean")`` with the edge matrices computed by the caller:

        h'_i = W_root h_i + b + mean_{j→i} h_jᵀ Θ(e_ji),    Θ = ``nn``: Linear(5, 128)-ReLU-Linear(128, dim²)

    (a node without incoming edges gets W_root h_i + b). Initialisation as ``NNConv``: default Linear init, b = 0.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.nn = nn.Sequential(nn.Linear(N_EDGE_FEATURES, 128), nn.ReLU(), nn.Linear(128, dim * dim))
        self.lin = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(dim))

    def edge_weights(self, edge_attr: Tensor) -> Tensor:
        """Θ(e) for every edge, (E, dim, dim)."""
        weights: Tensor = self.nn(edge_attr)
        return weights.view(-1, self.dim, self.dim)

    def forward(self, x: Tensor, edge_index: Tensor, weights: Tensor) -> Tensor:
        source, target = edge_index[0], edge_index[1]
        messages = torch.bmm(x[source].unsqueeze(1), weights).squeeze(1)
        total = x.new_zeros(x.shape[0], self.dim).index_add_(0, target, messages)
        degree = x.new_zeros(x.shape[0]).index_add_(0, target, x.new_ones(target.shape[0])).clamp_(min=1)
        out: Tensor = total / degree.unsqueeze(1) + self.lin(x) + self.bias
        return out


class QM9Encoder(nn.Module):
    """NNConv/GRU message passing and a Set2Set readout: graphs → (B, dim) features."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.lin0 = nn.Linear(N_NODE_FEATURES, dim)
        self.conv = EdgeConditionedConv(dim)
        self.gru = nn.GRU(dim, dim)
        self.set2set = Set2Set(dim, processing_steps=SET2SET_STEPS)
        self.lin1 = nn.Linear(2 * dim, dim)

    def forward(self, graphs: QM9Graphs) -> Tensor:
        out = F.relu(self.lin0(graphs.x))
        hidden = out.unsqueeze(0)
        weights = self.conv.edge_weights(graphs.edge_attr)
        for _ in range(MESSAGE_STEPS):
            message = F.relu(self.conv(out, graphs.edge_index, weights))
            out, hidden = self.gru(message.unsqueeze(0), hidden)
            out = out.squeeze(0)
        # dim_size from the batch's known size: torch_geometric would otherwise read batch.max() back to the host
        pooled = self.set2set(out, graphs.batch, dim_size=graphs.num_graphs)
        return F.relu(self.lin1(pooled))


class QM9Net(nn.Module):
    """Shared :class:`QM9Encoder` (``.encoder``) and ``n_tasks`` Linear(dim, 1) heads (``.heads``).

    ``forward(graphs)`` returns ``(features (B, dim), [ŷ_1 (B, 1), ..., ŷ_K (B, 1)])``.
    """

    def __init__(self, n_tasks: int = 11, dim: int = 64) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        self.encoder: nn.Module = QM9Encoder(dim)
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(n_tasks))

    def forward(self, graphs: QM9Graphs) -> tuple[Tensor, list[Tensor]]:
        features: Tensor = self.encoder(graphs)
        return features, [head(features) for head in self.heads]
