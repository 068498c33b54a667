"""A tiny synthetic benchmark for runner tests: two tasks with mixed metric directions, 4 steps per epoch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from taskbalance.benchmarks.base import Benchmark, Metric, MultiTaskModel, Split, TrainingProtocol
from taskbalance.benchmarks.batches import TensorBatches
from taskbalance.benchmarks.runner.training import Job

EPOCHS = 3


class TinyNet(nn.Module):
    """Encoder with dropout (so the RNG state matters on resume), a 2-class head and a regression head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2))
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 1)])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.encoder(x)
        return features, [head(features) for head in self.heads]


class Evaluator:
    def __init__(self) -> None:
        self.correct = 0.0
        self.squared = 0.0
        self.count = 0

    def update(self, outputs: list[Tensor], targets: Any) -> None:
        labels, values = targets
        self.correct += float((outputs[0].argmax(1) == labels).sum())
        self.squared += float((outputs[1].squeeze(1) - values).pow(2).sum())
        self.count += int(labels.shape[0])

    def compute(self) -> dict[str, float]:
        return {"acc/a": 100.0 * self.correct / self.count, "mse/b": self.squared / self.count}


class TinyBenchmark(Benchmark):
    """Two tasks with mixed metric directions on 64 synthetic training samples (4 steps per epoch)."""

    name: ClassVar[str] = "tiny"
    tasks: ClassVar[tuple[str, ...]] = ("a", "b")
    metrics: ClassVar[tuple[Metric, ...]] = (Metric("acc/a", "a", True), Metric("mse/b", "b", False))
    protocols: ClassVar[dict[str, TrainingProtocol]] = {
        "tiny": TrainingProtocol("tiny", epochs=EPOCHS, batch_size=16, lr=1e-2, description="synthetic", reduced=True)
    }
    default_protocol: ClassVar[str] = "tiny"

    def __init__(self, protocol: str | None = None, data_dir: str | None = None) -> None:
        super().__init__(protocol, data_dir)
        gen = torch.Generator().manual_seed(123)
        self.data: dict[str, tuple[Tensor, Tensor]] = {}
        for split, n in (("train", 64), ("val", 32), ("test", 32)):
            x = torch.randn(n, 4, generator=gen)
            self.data[split] = (x, torch.stack([(x[:, 0] > 0).double(), x[:, 1] + 0.5 * x[:, 2]], dim=1))
        self.initial_states: list[dict[str, Tensor]] = []
        self.first_batches: list[Tensor] = []

    def loader(self, split: Split, *, batch_size: int, shuffle: bool, generator: torch.Generator) -> Iterable[Any]:
        x, y = self.data[split]
        return TensorBatches(x, y, batch_size, shuffle, generator)

    def to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        x, y = batch
        if len(self.first_batches) < len(self.initial_states):  # the first training batch of each run
            self.first_batches.append(x.clone())
        return x.to(device), (y[:, 0].long().to(device), y[:, 1].float().to(device))

    def model(self) -> MultiTaskModel:
        net = TinyNet()
        self.initial_states.append({k: v.clone() for k, v in net.state_dict().items()})
        return cast(MultiTaskModel, net)

    def losses(self, outputs: list[Tensor], targets: Any) -> Tensor:
        labels, values = targets
        return torch.stack([F.cross_entropy(outputs[0], labels), F.mse_loss(outputs[1].squeeze(1), values)])

    def evaluator(self) -> Evaluator:
        return Evaluator()


class Killed(Exception):
    pass


def kill_at(spec: str, epoch: int, step: int, task: int | None = None) -> Any:
    def hook(job: Job, e: int, s: int) -> None:
        if job.spec == spec and job.task == task and (e, s) == (epoch, step):
            raise Killed

    return hook
