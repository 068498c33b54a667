"""QM9 as an 11-task regression benchmark (the MTL setting of Nash-MTL, FAMO and IGB).

Data, targets, units and graphs: :mod:`taskbalance.benchmarks.datasets.qm9`; model: :mod:`.models.mpnn`.

Split: the 130,831 molecules are shuffled once, 10,000 test, 10,000 validation, the rest (110,831) training.
Targets are z-scored with the mean and std of the training molecules actually trained on; each task's loss is the
MSE of its z-scored prediction; metrics are each target's MAE in its report unit (lower is better).

Protocols:
    paper  Adam 1e-3, batch 120, 300 epochs, ReduceLROnPlateau(factor 0.7, patience 5, min 1e-5) on the
           validation loss, full training split (Navon et al., ICML 2022, arXiv 2202.01017, Appendix).
    quick  REDUCED: the same model, optimiser and schedule on a 1,200-molecule training subset for 3 epochs,
           validated and tested on the first 600 molecules of the standard validation and test splits. One run
           takes minutes on a CPU (a training step at batch 120 costs seconds there); its MAEs are far from the
           paper's and only rank methods roughly.

Deliberate differences from the reference code (Nash-MTL's ``experiments/quantum_chemistry``):
- The split is drawn once with a fixed seed (:data:`SPLIT_SEED`) instead of with each run's seed, so every method,
  run seed and single-task baseline sees the same molecules; seeds then vary only initialisation and batch order.
- The plateau scheduler steps on the mean over targets of MAE / train std (the mean z-scored MAE); the reference
  steps on Δm against its published single-task MAEs, which a benchmark cannot assume. Both are scale-free
  averages of per-target errors.
- Node features come from RDKit bond perception on qm9pack's coordinates (see :mod:`.datasets.qm9`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Benchmark, Metric, MultiTaskModel, Split, TrainingProtocol
from .batches import Batches, Positions
from .datasets.qm9 import TASKS, UNITS, QM9Data, QM9Graphs, TargetScaler, load_arrays, split_indices

#: the seed of the one train/validation/test shuffle every run shares
SPLIT_SEED = 0

_PAPER = TrainingProtocol(
    name="paper", epochs=300, batch_size=120, lr=1e-3,
    description="full QM9 split (110,831 / 10,000 / 10,000), 300 epochs, Adam 1e-3, batch 120, "
    "ReduceLROnPlateau(0.7, patience 5, min 1e-5)",
)  # fmt: skip


class QM9Benchmark(Benchmark):
    """QM9, 11 targets, MPNN encoder with linear heads; MAE per target in :data:`UNITS` (lower is better)."""

    name: ClassVar[str] = "qm9"
    tasks: ClassVar[tuple[str, ...]] = TASKS
    metrics: ClassVar[tuple[Metric, ...]] = tuple(Metric(f"mae/{task}", task, False) for task in TASKS)
    units: ClassVar[dict[str, str]] = {f"mae/{task}": unit for task, unit in UNITS.items()}
    protocols: ClassVar[dict[str, TrainingProtocol]] = {
        "paper": _PAPER,
        "quick": _PAPER.reduced_to(
            "quick",
            "REDUCED: 1,200 training molecules, 3 epochs, first 600 of the validation and test splits; Adam 1e-3, "
            "batch 120 (minutes on a CPU; not comparable with published MAEs)",
            epochs=3,
            train_size=1_200,
            eval_size=600,
        ),
    }
    default_protocol: ClassVar[str] = "quick"
    #: molecules held out for validation and for test (the standard 10,000 each)
    val_size: ClassVar[int] = 10_000
    test_size: ClassVar[int] = 10_000

    def __init__(self, protocol: str | None = None, data_dir: str | None = None) -> None:
        super().__init__(protocol, data_dir)
        self._data: QM9Data | None = None
        self._splits: dict[str, Tensor] = {}
        self._scaler: TargetScaler | None = None

    def _setup(self) -> tuple[QM9Data, dict[str, Tensor], TargetScaler]:
        """Load (or build and cache) the molecules, split them and fit the target scaling, once."""
        if self._data is None or self._scaler is None:
            data = QM9Data(load_arrays(self.data_dir))
            drawn = split_indices(len(data), SPLIT_SEED, self.val_size, self.test_size)
            splits = {split: torch.from_numpy(ids) for split, ids in drawn.items()}
            splits["train"] = _prefix(splits["train"], self.protocol.train_size, "train_size")
            for split in ("val", "test"):
                splits[split] = _prefix(splits[split], self.protocol.eval_size, "eval_size")
            self._scaler = TargetScaler.fit(data.y[splits["train"]])
            self._data, self._splits = data, splits
        return self._data, self._splits, self._scaler

    @property
    def scaler(self) -> TargetScaler:
        """Mean and std (report units) of the training targets."""
        return self._setup()[2]

    def split_ids(self, split: Split) -> Tensor:
        """The molecules (row numbers) of ``split`` under this protocol."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return self._setup()[1][split]

    def loader(self, split: Split, *, batch_size: int, shuffle: bool, generator: torch.Generator) -> QM9Loader:
        data, _, scaler = self._setup()
        return QM9Loader(data, scaler, self.split_ids(split), batch_size, shuffle, generator)

    def model(self) -> MultiTaskModel:
        from .models.mpnn import QM9Net  # torch_geometric is an optional extra

        return QM9Net(n_tasks=self.n_tasks)

    def losses(self, outputs: list[Tensor], targets: Tensor) -> Tensor:
        """MSE of each task's z-scored prediction, (K,)."""
        predictions = torch.cat(outputs, dim=1)
        return (predictions - targets).square().mean(dim=0)

    def evaluator(self) -> QM9Evaluator:
        return QM9Evaluator(self.scaler.std)

    def to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        graphs, targets = batch
        return graphs.to(device), targets.to(device)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.7, patience=5, min_lr=1e-5)

    def step_scheduler(self, scheduler: Any, val_metrics: dict[str, float]) -> None:
        scheduler.step(self.validation_loss(val_metrics))

    def validation_loss(self, val_metrics: dict[str, float]) -> float:
        """Mean over targets of MAE / train std: the plateau scheduler's signal."""
        std = self.scaler.std.tolist()
        return float(
            sum(val_metrics[f"mae/{task}"] / s for task, s in zip(self.tasks, std, strict=True)) / self.n_tasks
        )


def _prefix(ids: Tensor, size: int | None, option: str) -> Tensor:
    if size is None:
        return ids
    if not 2 <= size <= ids.numel():
        raise ValueError(f"{option} must be in 2..{ids.numel()}, got {size}")
    return ids[:size]


class QM9Loader(Batches[tuple[QM9Graphs, Tensor]]):
    """Batches ``(graphs, z-scored targets (B, 11) float32)`` of the molecules ``ids`` of a split."""

    def __init__(
        self,
        data: QM9Data,
        scaler: TargetScaler,
        ids: Tensor,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator,
    ) -> None:
        super().__init__(ids.numel(), batch_size, shuffle, generator)
        self.data, self.scaler, self.ids = data, scaler, ids

    def batch(self, positions: Positions) -> tuple[QM9Graphs, Tensor]:
        ids = self.ids[positions]
        return self.data.graphs(ids), self.scaler.scale(self.data.y[ids])


class QM9Evaluator:
    """Per-target MAE in report units: mean over molecules of |ŷ − y| (z-scored) × the target's train std."""

    def __init__(self, std: Tensor) -> None:
        self.std = std
        self.total: Tensor | None = None
        self.count = 0

    def update(self, outputs: list[Tensor], targets: Tensor) -> None:
        errors = (torch.cat(outputs, dim=1).detach() - targets).abs().sum(dim=0).to(torch.float64)
        self.total = errors if self.total is None else self.total + errors
        self.count += int(targets.shape[0])

    def compute(self) -> dict[str, float]:
        if self.total is None:
            raise ValueError("no batch was evaluated")
        mae = (self.total * self.std.to(self.total.device) / self.count).tolist()  # one transfer per evaluation
        return {f"mae/{task}": value for task, value in zip(TASKS, mae, strict=True)}


__all__ = ["QM9Benchmark", "QM9Evaluator", "QM9Loader"]
