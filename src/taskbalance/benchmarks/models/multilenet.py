"""MultiLeNet: the shared-encoder LeNet with one classifier head per task, the standard MultiMNIST model.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS 2018, arXiv 1810.04650):

    encoder: conv(1→10, 5×5) → maxpool 2 → ReLU → conv(10→20, 5×5) → channel dropout → maxpool 2 → ReLU
             → flatten (320) → Linear(320, 50) → ReLU
    head k:  Linear(50, 50) → ReLU → dropout → Linear(50, n_classes)   (logits; use cross-entropy)

Dropout p = 0.5 in both places, as in the reference. Deliberate differences from the reference code, which draws
its own Bernoulli masks: (1) we use standard inverted dropout (``nn.Dropout2d`` / ``nn.Dropout``, kept units
scaled by 1/(1 − p)); the reference multiplies by an unscaled 0/1 mask in training and by nothing at evaluation,
so evaluation activations are about twice the training ones; (2) the encoder's channel mask is drawn per sample,
not once for the whole batch. Both are the textbook behaviour the reference intended. ``dropout=0`` turns
dropout off (a deterministic network, useful in tests). Dropout draws from torch's global generator: seed it
(``torch.manual_seed``) for reproducible training.
"""

from __future__ import annotations

from torch import Tensor, nn


class MultiLeNet(nn.Module):
    """Shared LeNet encoder (``.encoder``, output (N, 50)) and ``n_tasks`` heads (``.heads``, logits (N, C)).

    Args:
        n_tasks: number of classification tasks (2 for MultiMNIST).
        n_classes: classes per task.
        dropout: dropout probability p in [0, 1) for the encoder's channel dropout and the heads' dropout.

    ``forward(x)`` returns ``(features, [logits_1, ..., logits_K])`` so that a training loop can hand the
    features to :meth:`taskbalance.Balancer.backward` and ``encoder.parameters()`` as the shared parameters.
    """

    def __init__(self, n_tasks: int = 2, n_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 10, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=5),
            nn.Dropout2d(dropout),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(320, 50),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Dropout(dropout), nn.Linear(50, n_classes))
            for _ in range(n_tasks)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``x`` (N, 1, 28, 28) → (features (N, 50), per-task logits (N, n_classes))."""
        features = self.encoder(x)
        return features, [head(features) for head in self.heads]
