"""SegNet-based multi-task models for dense prediction: the "split" baseline and MTAN.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention" (CVPR 2019, arXiv 1803.10704), the models
of the NYUv2 / Cityscapes benchmarks of Nash-MTL, CAGrad, FAMO and IGB.

Shared trunk (SegNet, filters f = (64, 128, 256, 512, 512)): five encoder stages, each a 3×3 conv block
(conv → BatchNorm → ReLU) from f_{s−1} to f_s followed by one (stages 0–1) or two (stages 2–4) f_s → f_s blocks and a
2×2 max-pool that keeps its indices; five mirrored decoder stages, each max-unpooling with those indices, then a
block f_s → f_{s−1} and one or two f_{s−1} blocks. The trunk maps (N, 3, H, W) to (N, 64, H, W); H and W must be
multiples of 32.

- :class:`SegNetSplit` ("split, standard" in MTAN): the trunk is ``.encoder``; every head reads its output.
- :class:`SegNetMTAN`: every task has its own soft-attention modules (1×1 conv → BN → ReLU → 1×1 conv → BN →
  sigmoid) that gate the trunk's features at every encoder and decoder stage; the 3×3 blocks between attention
  stages are shared by the tasks, so they belong to ``.encoder`` together with the trunk.

Task head (prediction layer): 3×3 conv f_0 → f_0, then 1×1 conv f_0 → channels (no normalisation or activation
in between, as in the reference). Outputs: segmentation logits (N, C, H, W), depth (N, 1, H, W), and unit-length
normals (N, 3, H, W).

Parameter counts at the reference width: SegNetSplit 25,055,185 (NYUv2: 13 classes, depth, normals) and
25,017,672 (Cityscapes: 7 classes, depth); SegNetMTAN 44,229,073 and 41,206,984. The reference models have 3
more each (the uncertainty-weighting log-variances, which live in this library's UW balancer). The trunk plus a
13-class head has 24,981,069, the single-task size the MTAN code divides by: the architecture matches.

Deliberate differences from the reference code: heads return logits (use cross-entropy) instead of
log-probabilities (use NLL): the same loss, and argmax is unchanged; the normals are normalised with an ε so a
zero vector cannot give NaN; the width is a parameter (``width``: f_0, the other stages scale with it) so reduced
protocols can run on a CPU. Initialisation as the reference: Xavier-normal conv weights, zero biases, BN weight 1
and bias 0 — drawn from torch's global generator (seed it for reproducible models).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: filter multipliers of the five SegNet stages (64, 128, 256, 512, 512 at width 64)
STAGE_MULTIPLIERS = (1, 2, 4, 8, 8)
_STAGES = len(STAGE_MULTIPLIERS)
_DIVISOR = 2**_STAGES


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _repeat_block(channels: int, times: int) -> nn.Sequential:
    return nn.Sequential(*(_conv_block(channels, channels) for _ in range(times)))


def _attention(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 1),
        nn.BatchNorm2d(c_mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_mid, c_out, 1),
        nn.BatchNorm2d(c_out),
        nn.Sigmoid(),
    )


def _initialise(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _filters(width: int) -> list[int]:
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return [width * m for m in STAGE_MULTIPLIERS]


def _check_channels(task_channels: Sequence[int]) -> list[int]:
    channels = list(task_channels)
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"task_channels must be a non-empty list of positive channel counts, got {channels}")
    return channels


class TrunkOutputs(NamedTuple):
    """Every tensor of one SegNet pass that MTAN's attention reads, stage by stage (index 0 = full resolution
    for the encoder lists; index 0 = the coarsest stage for the decoder lists, as the decoder runs)."""

    encoder_first: list[Tensor]  # output of each encoder stage's first block
    encoder_last: list[Tensor]  # output of each encoder stage's last block (before pooling)
    unpooled: list[Tensor]  # input of each decoder stage (after max-unpooling)
    decoder_last: list[Tensor]  # output of each decoder stage


class SegNet(nn.Module):
    """The shared SegNet encoder-decoder: (N, in_channels, H, W) → (N, width, H, W); H, W multiples of 32."""

    def __init__(self, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        f = _filters(width)
        self.out_channels = f[0]
        c_in = [in_channels, *f[:-1]]
        self.encoder_first = nn.ModuleList(_conv_block(c_in[s], f[s]) for s in range(_STAGES))
        self.encoder_rest = nn.ModuleList(_repeat_block(f[s], 1 if s < 2 else 2) for s in range(_STAGES))
        # decoder stage s (0 = finest) maps f_s → f_{s−1} (f_0 → f_0 at s = 0); run from s = 4 down to 0
        c_out = [f[0], *f[:-1]]
        self.decoder_first = nn.ModuleList(_conv_block(f[s], c_out[s]) for s in range(_STAGES))
        self.decoder_rest = nn.ModuleList(_repeat_block(c_out[s], 1 if s < 2 else 2) for s in range(_STAGES))
        _initialise(self)

    def trunk(self, x: Tensor) -> TrunkOutputs:
        """Run the encoder and decoder, keeping the intermediate tensors."""
        height, width = x.shape[-2:]
        if height % _DIVISOR or width % _DIVISOR:
            raise ValueError(f"SegNet needs height and width divisible by {_DIVISOR}, got {height}×{width}")
        first: list[Tensor] = []
        last: list[Tensor] = []
        indices: list[Tensor] = []
        h = x
        for s in range(_STAGES):
            first.append(self.encoder_first[s](h))
            last.append(self.encoder_rest[s](first[-1]))
            h, idx = F.max_pool2d(last[-1], 2, 2, return_indices=True)
            indices.append(idx)
        unpooled: list[Tensor] = []
        decoded: list[Tensor] = []
        for s in reversed(range(_STAGES)):
            unpooled.append(F.max_unpool2d(h, indices[s], (2, 2), (2, 2), output_size=last[s].shape[-2:]))
            h = self.decoder_rest[s](self.decoder_first[s](unpooled[-1]))
            decoded.append(h)
        return TrunkOutputs(first, last, unpooled, decoded)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x).decoder_last[-1]


class PredictionHead(nn.Module):
    """3×3 conv (c → c), 1×1 conv (c → out); ``normalise`` makes the output unit-length along channels."""

    def __init__(self, channels: int, out_channels: int, normalise: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, out_channels, 1))
        self.normalise = normalise
        _initialise(self)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layers(x)
        return F.normalize(out, dim=1) if self.normalise else out


def _heads(channels: int, task_channels: Sequence[int], normalise: Sequence[bool]) -> list[PredictionHead]:
    return [PredictionHead(channels, c, n) for c, n in zip(task_channels, normalise, strict=True)]


def _normalise_flags(task_channels: list[int], normalise: Sequence[bool] | None) -> list[bool]:
    flags = [c == 3 for c in task_channels] if normalise is None else list(normalise)
    if len(flags) != len(task_channels):
        raise ValueError(f"normalise has {len(flags)} entries for {len(task_channels)} tasks")
    return flags


class SegNetSplit(nn.Module):
    """MTAN's "split" baseline: a shared SegNet (``.encoder``) and one prediction head per task (``.heads``).

    Args:
        task_channels: output channels per task, e.g. (13, 1, 3) for NYUv2 (segmentation, depth, normals).
        width: channels of the first stage (64 in the papers).
        normalise: per task, whether the output is a unit vector per pixel; default: tasks with 3 channels.

    ``forward(x)`` returns ``(features, outputs)``: features (N, width, H, W) is what every head reads, so the
    Balancer's features-first path is exact here.
    """

    def __init__(self, task_channels: Sequence[int], width: int = 64, normalise: Sequence[bool] | None = None) -> None:
        super().__init__()
        channels = _check_channels(task_channels)
        self.encoder: nn.Module = SegNet(width)
        self.heads: nn.ModuleList = nn.ModuleList(_heads(width, channels, _normalise_flags(channels, normalise)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.encoder(x)
        return features, [head(features) for head in self.heads]


class MTANShared(nn.Module):
    """What MTAN's tasks share: the SegNet trunk and the 3×3 blocks between attention stages."""

    def __init__(self, width: int) -> None:
        super().__init__()
        f = _filters(width)
        self.trunk = SegNet(width)
        # encoder side: after stage s's attention, f_s → f_{s+1} (the last stage keeps f_4)
        self.encoder_blocks = nn.ModuleList(_conv_block(f[s], f[min(s + 1, _STAGES - 1)]) for s in range(_STAGES))
        # decoder side: before stage s's attention, f_s → f_{s−1} (f_0 → f_0 at s = 0; the coarsest keeps f_4)
        c_out = [f[0], f[0], f[1], f[2], f[4]]
        self.decoder_blocks = nn.ModuleList(_conv_block(f[s], c_out[s]) for s in range(_STAGES))
        _initialise(self)

    def forward(self, x: Tensor) -> TrunkOutputs:
        return self.trunk.trunk(x)


class TaskAttention(nn.Module):
    """One MTAN task: attention modules at the five encoder and five decoder stages, and its prediction head."""

    def __init__(self, width: int, out_channels: int, normalise: bool) -> None:
        super().__init__()
        f = _filters(width)
        # encoder stage s reads the trunk's first-block output (f_s) and, for s > 0, the previous attended
        # features after the shared block (f_s): 2·f_s channels in
        self.encoder_attention = nn.ModuleList(
            _attention(f[s] if s == 0 else 2 * f[s], f[s], f[s]) for s in range(_STAGES)
        )
        # decoder stage s reads the unpooled trunk tensor (f_s) and the shared block's output (f_{s−1}, f_4 at s=4)
        dec_out = [f[0], f[0], f[1], f[2], f[3]]
        self.decoder_attention = nn.ModuleList(
            _attention(f[s] + dec_out[s], dec_out[s], dec_out[s]) for s in range(_STAGES)
        )
        self.prediction = PredictionHead(f[0], out_channels, normalise)
        _initialise(self)

    def forward(self, shared: MTANShared, trunk: TrunkOutputs) -> Tensor:
        h: Tensor | None = None
        for s in range(_STAGES):
            source = trunk.encoder_first[s] if h is None else torch.cat([trunk.encoder_first[s], h], dim=1)
            attended = self.encoder_attention[s](source) * trunk.encoder_last[s]
            h = F.max_pool2d(shared.encoder_blocks[s](attended), 2, 2)
        assert h is not None
        for step, s in enumerate(reversed(range(_STAGES))):
            up = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
            mixed = shared.decoder_blocks[s](up)
            h = self.decoder_attention[s](torch.cat([trunk.unpooled[step], mixed], dim=1)) * trunk.decoder_last[step]
        out: Tensor = self.prediction(h)
        return out


class SegNetMTAN(nn.Module):
    """MTAN: a shared SegNet with per-task attention (``.encoder`` = trunk + shared blocks, ``.heads`` = one
    :class:`TaskAttention` per task).

    Args: as :class:`SegNetSplit`.

    ``forward(x)`` returns ``(None, outputs)``: the attention modules read ten intermediate tensors of the trunk,
    not one representation, so there is no single features tensor for the Balancer's features-first path; pass
    ``features=None`` (the engine then differentiates through the whole model; the result is exact either way).
    """

    def __init__(self, task_channels: Sequence[int], width: int = 64, normalise: Sequence[bool] | None = None) -> None:
        super().__init__()
        channels = _check_channels(task_channels)
        flags = _normalise_flags(channels, normalise)
        self.encoder: nn.Module = MTANShared(width)
        self.heads: nn.ModuleList = nn.ModuleList(
            TaskAttention(width, c, n) for c, n in zip(channels, flags, strict=True)
        )

    def forward(self, x: Tensor) -> tuple[None, list[Tensor]]:
        shared = self.encoder
        assert isinstance(shared, MTANShared)
        trunk = shared(x)
        return None, [head(shared, trunk) for head in self.heads]
