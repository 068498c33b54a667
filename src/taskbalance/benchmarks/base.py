"""The benchmark contract the runner trains against.

A benchmark bundles data (train / val / test loaders), a multi-task model with the encoder/heads split the
Balancer needs, the per-task losses, the evaluation metrics with their directions, and named protocols (the
paper's, and reduced ones that run in minutes on a CPU). The runner only ever talks to this interface, so a new
benchmark is one module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class Metric:
    """One reported number: ``name`` (unique in the benchmark), the ``task`` it measures, and its direction."""

    name: str
    task: str
    higher_is_better: bool


@dataclass(frozen=True)
class TrainingProtocol:
    """How a benchmark is trained and evaluated; every benchmark's protocols are of this one type.

    The first block applies to every benchmark; the model and input settings below it are read by the benchmarks
    whose models have them (and left at their defaults elsewhere). ``reduced`` protocols are labelled as such in
    every report.
    """

    name: str
    epochs: int
    batch_size: int
    lr: float
    description: str
    reduced: bool = False
    #: training subset size (None = the whole training split)
    train_size: int | None = None
    #: samples of the validation and of the test split that are evaluated, a prefix of each (None = all)
    eval_size: int | None = None
    #: StepLR period in epochs and factor (None = no step schedule; a benchmark may define another scheduler)
    lr_step: int | None = None
    lr_gamma: float = 0.5
    #: channels of the model's first stage (the SegNet and ResNet benchmarks; 64 in the papers)
    width: int = 64
    #: model variant where a benchmark has several (dense benchmarks: "mtan" or "split")
    model: str | None = None
    #: inputs resized to image_size × image_size (CelebA; None = the benchmark's native size)
    image_size: int | None = None
    #: keep every ``subsample``-th pixel in each direction (dense benchmarks; 1 = full resolution)
    subsample: int = 1
    #: random augmentation of training samples (dense benchmarks: scale crop and flip)
    augment: bool = False

    def reduced_to(self, name: str, description: str, **changes: Any) -> TrainingProtocol:
        """A REDUCED variant of this protocol (fewer epochs, a subset, a smaller model ...): ``changes`` set the
        fields that differ, everything else is kept."""
        return replace(self, name=name, description=description, reduced=True, **changes)


class MultiTaskModel(Protocol):
    """What the runner needs of a model: ``encoder`` (shared), ``heads`` (one per task), and
    ``forward(inputs) -> (features, [output_1, ..., output_K])``; ``features`` is None when the heads read more
    than one shared tensor (MTAN), so the engine must not take the features-first path."""

    @property
    def encoder(self) -> nn.Module: ...

    @property
    def heads(self) -> nn.ModuleList: ...

    def __call__(self, inputs: Any) -> tuple[Tensor | None, list[Tensor]]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


class Evaluator(Protocol):
    """Accumulates one split's outputs batch by batch, then reports every metric of the benchmark."""

    def update(self, outputs: list[Tensor], targets: Any) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Benchmark(ABC):
    """A multi-task benchmark: data, model, losses, metrics and protocols.

    Subclasses set the class attributes and implement the abstract methods. ``data_dir`` points at user-provided
    data where the benchmark cannot install its own (NYUv2, Cityscapes, CelebA).
    """

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    metrics: ClassVar[tuple[Metric, ...]]
    protocols: ClassVar[dict[str, TrainingProtocol]]
    default_protocol: ClassVar[str]

    def __init__(self, protocol: str | None = None, data_dir: str | None = None) -> None:
        protocol = self.default_protocol if protocol is None else protocol
        if protocol not in self.protocols:
            raise ValueError(
                f"{self.name} has no protocol {protocol!r}; choose from {', '.join(sorted(self.protocols))}"
            )
        self.protocol = self.protocols[protocol]
        self.data_dir = data_dir

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @abstractmethod
    def loader(self, split: Split, *, batch_size: int, shuffle: bool, generator: torch.Generator) -> Iterable[Any]:
        """Batches of ``split``; the order depends only on ``generator`` (for resumable, deterministic runs)."""

    @abstractmethod
    def model(self) -> MultiTaskModel:
        """A freshly initialised model (initialised from torch's global RNG, which the runner seeds)."""

    @abstractmethod
    def losses(self, outputs: list[Tensor], targets: Any) -> Tensor:
        """The K raw task losses (K,) of one batch."""

    @abstractmethod
    def evaluator(self) -> Evaluator:
        """A fresh accumulator of every metric in :attr:`metrics`."""

    def to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """(inputs, targets) of a batch on ``device``; the default handles ``(tensor, tensor)`` batches."""
        inputs, targets = batch
        return inputs.to(device), targets.to(device)

    def optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The protocol's optimizer; default Adam at the protocol's learning rate."""
        return torch.optim.Adam(parameters, lr=self.protocol.lr)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The protocol's learning-rate scheduler (anything with ``step`` and ``state_dict``): by default StepLR
        when the protocol sets ``lr_step``, else none."""
        if self.protocol.lr_step is None:
            return None
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.protocol.lr_step, gamma=self.protocol.lr_gamma)

    def step_scheduler(self, scheduler: Any, val_metrics: dict[str, float]) -> None:
        """Called once per epoch after validation; override for metric-driven schedulers (ReduceLROnPlateau)."""
        scheduler.step()

    def data_sources(self) -> dict[str, Path]:
        """The files and folders the data is read from, by a label that does not depend on where they are
        (a resumed run must find the same bytes at the same labels). The runner fingerprints every file under
        them (:mod:`.runner.fingerprint`). Default: ``data_dir`` when set; a benchmark that reads installed data
        lists it here."""
        return {} if self.data_dir is None else {"data_dir": Path(self.data_dir).expanduser()}

    def describe(self) -> str:
        """One line for reports: benchmark, protocol and whether it is reduced."""
        label = " (REDUCED protocol)" if self.protocol.reduced else ""
        return f"{self.name}, protocol {self.protocol.name}{label}: {self.protocol.description}"
