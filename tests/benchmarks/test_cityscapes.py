"""Cityscapes on a tiny release generated in MTAN's exact layout (and LibMTL's label folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import taskbalance as tb
from taskbalance.benchmarks.cityscapes import CityscapesBenchmark
from taskbalance.benchmarks.datasets.mnist import DataSourceError
from tests.benchmarks.dense_fixtures import write_cityscapes


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cityscapes(tmp_path_factory.mktemp("cityscapes"), n_train=9, n_val=3)


def first_batch(
    bench: CityscapesBenchmark, split: str = "train", batch_size: int = 2
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    loader = bench.loader(split, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    return next(iter(loader))


def test_batches_shapes_dtypes_and_classes(release: Path) -> None:
    bench = CityscapesBenchmark("paper", str(release))  # with augmentation
    image, (label, depth) = first_batch(bench)
    assert image.shape == (2, 3, 128, 256) and image.dtype == torch.float32
    assert label.shape == (2, 128, 256) and label.dtype == torch.int64
    assert depth.shape == (2, 1, 128, 256) and depth.dtype == torch.float32
    assert int(label.min()) == -1 and int(label.max()) < 7
    assert len(bench.split_indices("val")) == 1 and len(bench.split_indices("test")) == 3


def test_19_classes_read_label_19(release: Path) -> None:
    bench = CityscapesBenchmark("quick", str(release), n_classes=19, augment=False)
    image, (label, _) = first_batch(bench, batch_size=9)
    assert int(label.max()) >= 7  # label_7 would stop at 6
    assert bench.model()(image)[1][0].shape[1] == 19


def test_libmtl_label_folder_is_accepted_for_7_classes(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "libmtl", n_train=2, n_val=1, label_folders=("label",))
    _, (label, _) = first_batch(CityscapesBenchmark("paper", str(root)), batch_size=1)
    assert int(label.max()) < 7
    with pytest.raises(DataSourceError, match=r"label_19 is missing.*Expected MTAN's preprocessed Cityscapes"):
        first_batch(CityscapesBenchmark("paper", str(root), n_classes=19))


def test_bad_options_and_missing_data() -> None:
    with pytest.raises(ValueError, match="7 or 19"):
        CityscapesBenchmark(n_classes=8)
    with pytest.raises(DataSourceError, match="needs data_dir"):
        first_batch(CityscapesBenchmark())
    paper = CityscapesBenchmark.protocols["paper"]
    assert (paper.epochs, paper.batch_size, paper.lr) == (200, 8, 1e-4)


@pytest.mark.parametrize("protocol", ["quick", "quick-split"])
def test_one_training_step_and_evaluation(release: Path, protocol: str) -> None:
    bench = CityscapesBenchmark(protocol, str(release))
    torch.manual_seed(0)
    model = bench.model()
    optimizer = bench.optimizer(model.parameters())
    inputs, targets = bench.to_device(first_batch(bench), torch.device("cpu"))
    assert inputs.shape == (2, 3, 32, 64)  # every 4th pixel
    features, outputs = model(inputs)
    losses = bench.losses(outputs, targets)
    assert losses.shape == (2,) and bool(torch.isfinite(losses).all())
    result = tb.make("ew", n_tasks=2).backward(losses, shared_params=model.encoder.parameters(), features=features)
    torch.testing.assert_close(result.weights, torch.ones(2))
    optimizer.step()
    evaluator = bench.evaluator()
    model.eval()
    with torch.no_grad():
        for batch in bench.loader("test", batch_size=2, shuffle=False, generator=torch.Generator()):
            inputs, targets = bench.to_device(batch, torch.device("cpu"))
            evaluator.update(model(inputs)[1], targets)
    values = evaluator.compute()
    assert set(values) == {"miou", "pix_acc", "abs_err", "rel_err"}
    assert 0 <= values["pix_acc"] <= 100 and values["abs_err"] > 0
