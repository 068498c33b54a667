"""The MNIST-family benchmarks on IDX fixture digits: data paths, splits and subsets, batching, losses, metrics,
protocols, and a short end-to-end run through the runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from taskbalance.benchmarks import multimnist as mb
from taskbalance.benchmarks.base import TrainingProtocol
from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.runner.compare import run
from tests.benchmarks.fixtures import glyph_images, write_idx_dir

N_TRAIN, N_TEST, VAL = 60, 30, 12


@pytest.fixture(autouse=True)
def _small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(mb, "VAL_SIZE", VAL)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """``mnist/`` and ``fashion/`` subdirectories of glyph digits whose label is readable from the pixels."""
    root = tmp_path / "data"
    for name, seed in (("mnist", 0), ("fashion", 1)):
        rng = np.random.default_rng(seed)
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            labels = rng.integers(0, 10, n).astype(np.uint8)
            write_idx_dir(root / name, split, glyph_images(labels), labels)
    return root


def _tiny_protocol(monkeypatch: pytest.MonkeyPatch, train_size: int | None = 24, epochs: int = 2) -> None:
    protocol = TrainingProtocol("quick", epochs, 8, 1e-2, "fixture", reduced=True, train_size=train_size)
    monkeypatch.setitem(mb.PROTOCOLS, "quick", protocol)


def test_protocols() -> None:
    paper, quick = mb.PROTOCOLS["paper"], mb.PROTOCOLS["quick"]
    assert (paper.epochs, paper.batch_size, paper.lr, paper.reduced, paper.train_size) == (100, 256, 1e-3, False, None)
    assert quick.reduced and quick.train_size == 10_000 and quick.epochs >= 6  # IGBv2's policy acts from epoch 6
    assert mb.MultiMNISTBenchmark.default_protocol == "quick"
    bench = mb.MultiMNISTBenchmark(protocol="paper")
    optimizer = bench.optimizer([torch.nn.Parameter(torch.zeros(1))])
    scheduler = bench.scheduler(optimizer)
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert (
        lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(0.85e-3) and lrs[20] == pytest.approx(0.85**2 * 1e-3)
    )


def test_metrics_and_tasks() -> None:
    bench = mb.MultiFashionMNISTBenchmark()
    assert bench.tasks == ("left", "right")
    assert [(m.name, m.task, m.higher_is_better) for m in bench.metrics] == [
        ("acc/left", "left", True),
        ("acc/right", "right", True),
    ]


@pytest.mark.parametrize(
    ("cls", "left", "right"),
    [
        (mb.MultiMNISTBenchmark, "mnist", "mnist"),
        (mb.MultiFashionBenchmark, "fashion", "fashion"),
        (mb.MultiFashionMNISTBenchmark, "fashion", "mnist"),
    ],
)
def test_splits_from_data_dir_and_labels(
    cls: type[mb.MultiMNISTFamily], left: str, right: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tiny_protocol(monkeypatch, train_size=24)
    bench = cls(data_dir=str(data_dir))
    train, val, test = bench.split_data("train"), bench.split_data("val"), bench.split_data("test")
    assert (len(train), len(val), len(test)) == (24, VAL, N_TEST)  # train cut to the protocol's train_size
    assert set(train.sources[:, 0]).isdisjoint(set(val.sources[:, 0]))
    # labels are the source digits of the right dataset on each side
    from taskbalance.benchmarks.datasets.mnist import load_idx_split

    sources = {name: load_idx_split(data_dir / name, "train") for name in ("mnist", "fashion")}
    np.testing.assert_array_equal(train.labels[:, 0], sources[left].labels[train.sources[:, 0]])
    np.testing.assert_array_equal(train.labels[:, 1], sources[right].labels[train.sources[:, 1]])
    _tiny_protocol(monkeypatch, train_size=None)
    assert len(cls(data_dir=str(data_dir)).split_data("train")) == N_TRAIN - VAL


def test_data_dir_rules(data_dir: Path) -> None:
    # a single-source benchmark also takes the IDX directory itself
    direct = mb.MultiMNISTBenchmark(data_dir=str(data_dir / "mnist"))
    assert len(direct.split_data("test")) == N_TEST
    with pytest.raises(FileNotFoundError, match="needs subdirectories fashion/ and mnist/"):
        mb.MultiFashionMNISTBenchmark(data_dir=str(data_dir / "mnist"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        mb.MultiMNISTBenchmark(data_dir=str(data_dir / "nope"))


def test_loader_batches_are_deterministic_and_cover_the_split(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_protocol(monkeypatch, train_size=24)
    bench = mb.MultiMNISTBenchmark(data_dir=str(data_dir))

    def labels(seed: int, shuffle: bool) -> list[torch.Tensor]:
        loader = bench.loader("train", batch_size=10, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))
        assert len(loader) == 3  # type: ignore[arg-type]
        return [y for _, y in loader]

    first, again, other = labels(0, True), labels(0, True), labels(1, True)
    assert [b.shape[0] for b in first] == [10, 10, 4]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    ordered = torch.cat(labels(0, False))
    assert torch.equal(ordered, torch.from_numpy(bench.split_data("train").labels))
    assert torch.equal(torch.cat(first).sort(0).values, ordered.sort(0).values)  # a permutation of the split
    x, _ = next(iter(bench.loader("test", batch_size=4, shuffle=False, generator=torch.Generator())))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32


def test_losses_and_accuracy_hand_computed() -> None:
    bench = mb.MultiMNISTBenchmark()
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])]
    targets = torch.tensor([[0, 1], [1, 1], [1, 1]])
    losses = bench.losses(logits, targets)
    expected = [
        torch.nn.functional.cross_entropy(logits[0], targets[:, 0]),
        torch.nn.functional.cross_entropy(logits[1], targets[:, 1]),
    ]
    assert torch.allclose(losses, torch.stack(expected))
    evaluator = bench.evaluator()
    evaluator.update(logits, targets)  # left: 2 of 3 right; right: 2 of 3
    evaluator.update([logits[0][:1], logits[1][:1]], targets[:1])  # both right: 3 of 4 on each task
    assert evaluator.compute() == pytest.approx({"acc/left": 75.0, "acc/right": 75.0})
    with pytest.raises(ValueError, match="no batches"):
        bench.evaluator().compute()


def test_model_outputs() -> None:
    model = mb.MultiMNISTBenchmark().model()
    features, logits = model(torch.zeros(3, 1, 28, 28))
    assert features is not None and features.shape == (3, 50) and [t.shape for t in logits] == [(3, 10), (3, 10)]


def test_end_to_end_run_on_fixture_digits(data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _tiny_protocol(monkeypatch, train_size=24, epochs=2)
    out = tmp_path / "run"
    result = run("multimnist", ["ew", "igbv1"], seeds=1, out_dir=out, data_dir=str(data_dir), progress=False)
    final = json.loads((out / "runs" / "igbv1" / "seed0" / "final.json").read_text())
    assert final["best_epoch"] in (1, 2) and set(final["test"]) == {"acc/left", "acc/right"}
    assert set(result.results["methods"]) == {"ew", "igbv1"}
    assert "multimnist" in result.table and "REDUCED protocol" in result.table
