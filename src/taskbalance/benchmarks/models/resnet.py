"""CelebA's model: Sener & Koltun's ResNet-18 trunk with one linear head per attribute.

Sener & Koltun (NeurIPS 2018, arXiv 1810.04650): a 3×3 stride-1 stem, no max-pool, four stages of two basic
blocks, 64→512 channels, average-pooled to 2×2 → 2048 features at 64×64. Deliberate differences: their heads are
2-way log-softmax classifiers trained with NLL; one logit with BCE is the same model family with half the head
parameters. The pooling is adaptive (2×2 output), which equals the reference's fixed 4×4 average pooling at 64×64
and also serves smaller inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F


class _BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus the (projected when the shape changes) input, then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CelebAResNet(nn.Module):
    """ResNet-18-style trunk (``.encoder``, output (N, 32·width)) and ``n_tasks`` one-logit heads (``.heads``).

    Args:
        n_tasks: number of binary attributes (40).
        width: channels of the first stage (64 as in ResNet-18; stages use width, 2·, 4·, 8·width).
        blocks: basic blocks per stage ((2, 2, 2, 2) is ResNet-18).

    ``forward(x)`` with x (N, 3, S, S) returns ``(features, [logit_1 (N,), ..., logit_K (N,)])``.
    """

    def __init__(self, n_tasks: int = 40, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be four counts >= 1, got {tuple(blocks)}")
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            for index in range(count):
                layers.append(_BasicBlock(channels, out_channels, stride=2 if stage > 0 and index == 0 else 1))
                channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        self.encoder: nn.Module = nn.Sequential(*layers)
        self.features = 4 * channels
        self.heads = nn.ModuleList(nn.Linear(self.features, 1) for _ in range(n_tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.encoder(x)
        return features, [head(features).squeeze(-1) for head in self.heads]
