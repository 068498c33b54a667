"""NYUv2 on a tiny release generated in MTAN's exact layout: loading, splits, augmentation, errors, training."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import taskbalance as tb
from taskbalance.benchmarks.base import TrainingProtocol
from taskbalance.benchmarks.datasets.dense import scale_crop_flip
from taskbalance.benchmarks.datasets.mnist import DataSourceError
from taskbalance.benchmarks.nyuv2 import NYUv2Benchmark
from tests.benchmarks.dense_fixtures import write_nyuv2


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nyuv2(tmp_path_factory.mktemp("nyuv2"), n_train=9, n_val=3)


def first_batch(
    bench: NYUv2Benchmark, split: str = "train", seed: int = 0, batch_size: int = 2
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return next(iter(bench.loader(split, batch_size=batch_size, shuffle=False, generator=generator)))  # type: ignore[arg-type]


def test_batches_have_the_release_contents_shapes_and_dtypes(release: Path) -> None:
    bench = NYUv2Benchmark("paper", str(release), augment=False)
    image, (label, depth, normal) = first_batch(bench)
    assert image.shape == (2, 3, 288, 384) and image.dtype == torch.float32
    assert label.shape == (2, 288, 384) and label.dtype == torch.int64
    assert depth.shape == (2, 1, 288, 384) and normal.shape == (2, 3, 288, 384)
    index = bench.split_indices("train")[0]
    raw_label = np.load(release / "train" / "label" / f"{index}.npy")
    raw_normal = np.load(release / "train" / "normal" / f"{index}.npy")
    assert np.array_equal(label[0].numpy(), raw_label.astype(np.int64))
    assert np.allclose(normal[0].numpy(), np.moveaxis(raw_normal, -1, 0))
    assert (label == -1).any() and int(label.max()) < 13  # the unlabelled column stays −1


def test_validation_is_a_fixed_holdout_of_train_and_test_is_the_release_val(release: Path) -> None:
    bench = NYUv2Benchmark("paper", str(release))
    train, val, test = (bench.split_indices(s) for s in ("train", "val", "test"))  # type: ignore[arg-type]
    assert len(val) == round(9 * 0.12) and sorted(train + val) == list(range(9))
    assert test == [0, 1, 2]
    assert NYUv2Benchmark("paper", str(release)).split_indices("val") == val  # same for every run


def test_order_and_augmentation_depend_only_on_the_generator(release: Path) -> None:
    bench = NYUv2Benchmark("paper", str(release))
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(7)
        loader = bench.loader("train", batch_size=3, shuffle=True, generator=generator)
        batches = list(loader)
        runs.append((batches, generator.get_state()))
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))
    # everything is drawn when the pass starts: consuming one batch leaves the generator where a full pass does
    generator = torch.Generator().manual_seed(7)
    next(iter(bench.loader("train", batch_size=3, shuffle=True, generator=generator)))
    assert torch.equal(generator.get_state(), runs[0][1])


def test_a_flip_mirrors_every_map_and_negates_the_normals_x() -> None:
    torch.manual_seed(0)
    sample = {
        "image": torch.rand(3, 4, 6),
        "label": torch.randint(-1, 13, (4, 6)),
        "depth": torch.rand(1, 4, 6) + 0.5,
        "normal": torch.nn.functional.normalize(torch.randn(3, 4, 6), dim=0),
    }
    out = scale_crop_flip(sample, torch.tensor([0.0, 0.0, 0.0, 0.1]))  # scale 1, flip
    for kind in ("image", "label", "depth"):
        assert torch.equal(out[kind], sample[kind].flip(-1))
    assert torch.equal(out["normal"][0], -sample["normal"][0].flip(-1))
    assert torch.equal(out["normal"][1:], sample["normal"][1:].flip(-1))
    kept = scale_crop_flip(sample, torch.tensor([0.0, 0.5, 0.5, 0.9]))  # scale 1, no flip: unchanged
    assert all(torch.equal(kept[k], sample[k]) for k in sample)


def test_a_scale_crop_divides_depth_by_the_scale() -> None:
    depth = torch.arange(1.0, 1.0 + 12 * 12).view(1, 12, 12)
    sample = {"image": torch.rand(3, 12, 12), "label": torch.zeros(12, 12, dtype=torch.long), "depth": depth}
    out = scale_crop_flip(sample, torch.tensor([0.99, 0.0, 0.0, 0.9]))  # scale 1.5: crop 8×8 at the corner
    assert out["depth"].shape == (1, 12, 12)
    torch.testing.assert_close(out["depth"][0, 0, 0], depth[0, 0, 0] / 1.5)
    crop_values = set((depth[0, :8, :8] / 1.5).flatten().tolist())
    assert set(out["depth"].flatten().tolist()) <= crop_values  # nearest: no blended depths


def test_integer_labels_are_accepted(tmp_path: Path) -> None:
    root = write_nyuv2(tmp_path / "ints", n_train=2, n_val=1, height=32, width=32, label_dtype=np.int16)
    bench = NYUv2Benchmark("paper", str(root), augment=False)
    _, (label, _, _) = first_batch(bench, batch_size=1)
    assert label.dtype == torch.int64 and (label == -1).any()


def test_missing_or_malformed_data_gets_clear_errors(tmp_path: Path, release: Path) -> None:
    with pytest.raises(DataSourceError, match="needs data_dir"):
        first_batch(NYUv2Benchmark("paper"))
    with pytest.raises(DataSourceError, match="not a directory"):
        first_batch(NYUv2Benchmark("paper", str(tmp_path / "absent")))
    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    shutil.rmtree(broken / "train" / "normal")
    with pytest.raises(DataSourceError, match=r"normal is missing.*Expected MTAN's preprocessed NYUv2"):
        first_batch(NYUv2Benchmark("paper", str(broken)))
    shutil.copytree(release / "train" / "normal", broken / "train" / "normal")
    (broken / "train" / "depth" / "4.npy").rename(broken / "train" / "depth" / "40.npy")
    with pytest.raises(DataSourceError, match=r"40\.npy"):
        first_batch(NYUv2Benchmark("paper", str(broken)))
    (broken / "train" / "depth" / "40.npy").rename(broken / "train" / "depth" / "4.npy")
    bench = NYUv2Benchmark("paper", str(broken), augment=False)
    index = bench.split_indices("train")[0]
    np.save(broken / "train" / "label" / f"{index}.npy", np.full((288, 384), 13.0))
    with pytest.raises(DataSourceError, match=rf"label/{index}.npy: labels must be integers in −1 … 12"):
        first_batch(bench)
    np.save(broken / "train" / "label" / f"{index}.npy", np.zeros((288, 384)))
    np.save(broken / "train" / "normal" / f"{index}.npy", np.zeros((288, 384, 2)))
    with pytest.raises(DataSourceError, match=r"normal must be \(H, W, 3\)"):
        first_batch(bench)


def test_protocols() -> None:
    paper = NYUv2Benchmark.protocols["paper"]
    assert isinstance(paper, TrainingProtocol)
    assert (paper.epochs, paper.batch_size, paper.lr, paper.lr_step, paper.lr_gamma) == (200, 2, 1e-4, 100, 0.5)
    split = NYUv2Benchmark.protocols["paper-split"]
    assert isinstance(split, TrainingProtocol)
    assert paper.model == "mtan" and split.model == "split"
    assert all(NYUv2Benchmark.protocols[p].reduced for p in ("quick", "quick-split")) and not paper.reduced
    with pytest.raises(ValueError, match="choose from"):
        NYUv2Benchmark("fast")
    with pytest.raises(ValueError, match="reduction"):
        NYUv2Benchmark(reduction="mean")  # type: ignore[arg-type]
    bench = NYUv2Benchmark("paper")
    scheduler = bench.scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 100


@pytest.mark.parametrize("protocol", ["quick", "quick-split"])
def test_one_training_step_and_evaluation(release: Path, protocol: str) -> None:
    bench = NYUv2Benchmark(protocol, str(release))
    torch.manual_seed(0)
    model = bench.model()
    optimizer = bench.optimizer(model.parameters())
    balancer = tb.make("ew", n_tasks=bench.n_tasks)
    batch = first_batch(bench, batch_size=2)
    inputs, targets = bench.to_device(batch, torch.device("cpu"))
    assert inputs.shape == (2, 3, 96, 128)  # every 3rd pixel
    features, outputs = model(inputs)
    losses = bench.losses(outputs, targets)
    assert losses.shape == (3,) and bool(torch.isfinite(losses).all())
    before = [p.detach().clone() for p in model.parameters()]
    balancer.backward(losses, shared_params=model.encoder.parameters(), features=features)
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    evaluator = bench.evaluator()
    model.eval()
    with torch.no_grad():
        for batch in bench.loader("val", batch_size=2, shuffle=False, generator=torch.Generator()):
            inputs, targets = bench.to_device(batch, torch.device("cpu"))
            evaluator.update(model(inputs)[1], targets)
    assert set(evaluator.compute()) == {m.name for m in bench.metrics}
