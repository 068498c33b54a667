"""MultiMNIST construction: the overlay/resize rule, labels, splits, seeding and caching, on fixture digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.datasets import multimnist as mm
from taskbalance.benchmarks.datasets.mnist import Digits
from tests.benchmarks.fixtures import glyph_images, write_idx_dir

N_TRAIN, N_TEST = 60, 20


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


def _digits(n: int, seed: int) -> Digits:
    labels = np.random.default_rng(seed).integers(0, 10, size=n).astype(np.uint8)
    return Digits(glyph_images(labels), labels)


def _read_glyphs(images: np.ndarray) -> np.ndarray:
    """(left, right) labels read back from composites of :func:`glyph_images` digits.

    Output pixel (2, 2) samples canvas pixel (3, 3), inside the left block only; output (12, 12) samples canvas
    (16, 16), inside the right block (canvas 8..19) and outside the left block (canvas 2..13).
    """
    return np.stack([(images[:, 2, 2] - 10) // 20, (images[:, 12, 12] - 10) // 20], axis=1)


@pytest.fixture
def idx_dirs(tmp_path: Path) -> tuple[Path, Path]:
    mnist_dir, fashion_dir = tmp_path / "mnist", tmp_path / "fashion"
    for directory, seed in ((mnist_dir, 0), (fashion_dir, 1)):
        train, test = _digits(N_TRAIN, seed), _digits(N_TEST, seed + 10)
        write_idx_dir(directory, "train", *train)
        write_idx_dir(directory, "test", *test)
    return mnist_dir, fashion_dir


def test_nearest_rows_are_pils_rule() -> None:
    expected = [0, 1, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 16, 17, 18, 19, 21, 22, 23, 25, 26, 27, 28, 30, 31, 32, 34, 35]
    assert mm.NEAREST.tolist() == expected


def test_overlay_hand_made_example() -> None:
    left = np.full((1, 28, 28), 100, np.uint8)
    right = np.full((1, 28, 28), 50, np.uint8)
    right[0, 1, 1] = 200  # canvas (7, 7), in the overlap, sampled by output (5, 5): the right's 200 wins
    right[0, 21, 21] = 60  # canvas (27, 27), in the overlap, sampled by output (21, 21): the left's 100 wins
    right[0, 0, 0] = 250  # canvas (6, 6): row/column 6 is skipped by the resize, so 250 appears nowhere
    out = mm.overlay(left, right)[0]
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out[0, 0] == 100  # canvas (0, 0): left only
    assert out[27, 27] == 0  # canvas (35, 35): outside both images
    assert out[0, 27] == 0 and out[27, 0] == 0  # canvas corners covered by neither
    assert out[22, 22] == 50  # canvas (28, 28): right only
    assert out[5, 5] == 200
    assert out[21, 21] == 100
    assert out[4, 4] == 100  # canvas (5, 5): left only, next to the overlap
    assert 250 not in out


def _naive_overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    canvas = np.zeros((36, 36))
    canvas[0:28, 0:28] = left
    for r in range(28):
        for c in range(28):
            canvas[6 + r, 6 + c] = max(canvas[6 + r, 6 + c], right[r, c])
    out = np.zeros((28, 28), np.uint8)
    for i in range(28):
        for j in range(28):
            out[i, j] = canvas[int((i + 0.5) * 36 / 28), int((j + 0.5) * 36 / 28)]
    return out


@given(st.integers(0, 2**32 - 1))
def test_overlay_matches_a_pixel_by_pixel_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    left, right = rng.integers(0, 256, (2, 2, 28, 28), dtype=np.uint8)
    out = mm.overlay(left, right)
    for k in range(2):
        np.testing.assert_array_equal(out[k], _naive_overlay(left[k], right[k]))


def test_overlay_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        mm.overlay(np.zeros((2, 28, 28), np.uint8), np.zeros((3, 28, 28), np.uint8))


def test_labels_are_the_source_digits() -> None:
    raw = _digits(200, seed=3)
    images, labels, partners = mm.construct(raw, raw, np.random.default_rng(0))
    np.testing.assert_array_equal(_read_glyphs(images), labels)
    np.testing.assert_array_equal(labels[:, 0], raw.labels)
    np.testing.assert_array_equal(labels[:, 1], raw.labels[partners])
    assert len(np.unique(partners)) > 100  # random partners, not a fixed shift


def test_splits_sizes_disjoint_and_consistent() -> None:
    raw = _digits(N_TRAIN, seed=4)
    parts = {split: mm.build_split(raw, raw, split, seed=7, val_size=15) for split in ("train", "val")}
    assert len(parts["train"][0]) == N_TRAIN - 15 and len(parts["val"][0]) == 15
    train_sources, val_sources = set(parts["train"][2].ravel()), set(parts["val"][2].ravel())
    assert not train_sources & val_sources  # no source image (left or right) in both
    assert set(parts["train"][2][:, 0]) | set(parts["val"][2][:, 0]) == set(range(N_TRAIN))  # every image once left
    for images, labels, sources in parts.values():
        assert images.shape[1:] == (28, 28) and labels.shape == (len(images), 2) and labels.dtype == np.int64
        np.testing.assert_array_equal(labels, raw.labels[sources])
        np.testing.assert_array_equal(_read_glyphs(images), labels)


def test_seeded_determinism_and_different_seeds_differ() -> None:
    raw = _digits(N_TRAIN, seed=5)
    a = mm.build_split(raw, raw, "train", seed=1, val_size=10)
    b = mm.build_split(raw, raw, "train", seed=1, val_size=10)
    c = mm.build_split(raw, raw, "train", seed=2, val_size=10)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    t1 = mm.build_split(raw, raw, "test", seed=1, val_size=10)
    t2 = mm.build_split(raw, raw, "test", seed=2, val_size=10)
    np.testing.assert_array_equal(t1[2][:, 0], np.arange(N_TRAIN))
    assert not np.array_equal(t1[2][:, 1], t2[2][:, 1])


def test_bad_split_options() -> None:
    raw = _digits(10, seed=6)
    with pytest.raises(ValueError, match=r"val_size must be in 0\.\.9"):
        mm.build_split(raw, raw, "train", seed=0, val_size=10)
    with pytest.raises(ValueError, match="validation split is empty"):
        mm.build_split(raw, raw, "val", seed=0, val_size=0)
    with pytest.raises(ValueError, match="seed must be non-negative"):
        mm.build_split(raw, raw, "train", seed=-1, val_size=2)
    with pytest.raises(ValueError, match="dataset must be one of"):
        mm.load_multimnist("multikmnist")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split must be"):
        mm.load_multimnist("multimnist", "dev")  # type: ignore[arg-type]


@pytest.mark.parametrize("dataset", ["multimnist", "multifashion", "multifashion_mnist"])
def test_load_from_idx_paths_and_cache(idx_dirs: tuple[Path, Path], dataset: str) -> None:
    mnist_dir, fashion_dir = idx_dirs
    kwargs = {"seed": 3, "val_size": 12, "mnist_path": mnist_dir, "fashion_path": fashion_dir}
    splits = {split: mm.load_multimnist(dataset, split, **kwargs) for split in ("train", "val", "test")}  # type: ignore[arg-type]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [N_TRAIN - 12, 12, N_TEST]
    left_name, right_name = mm.SOURCES[dataset]
    train_raw = {name: _digits(N_TRAIN, seed) for name, seed in (("mnist", 0), ("fashion", 1))}
    train = splits["train"]
    np.testing.assert_array_equal(train.labels[:, 0], train_raw[left_name].labels[train.sources[:, 0]])
    np.testing.assert_array_equal(train.labels[:, 1], train_raw[right_name].labels[train.sources[:, 1]])
    np.testing.assert_array_equal(_read_glyphs(train.images), train.labels)
    assert len(list(cache.cache_dir().glob(f"{dataset}-seed3-*.npz"))) == 3
    again = mm.load_multimnist(dataset, "train", **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.images, train.images)


def test_dataset_tensors_and_items(idx_dirs: tuple[Path, Path]) -> None:
    data = mm.load_multimnist("multimnist", "test", mnist_path=idx_dirs[0], cache=False)
    assert not list(cache.cache_dir().glob("*.npz"))
    x, y = data.tensors()
    assert x.shape == (N_TEST, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (N_TEST, 2) and y.dtype == torch.int64
    expected = (torch.from_numpy(data.images).double() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x[:, 0].double(), expected, rtol=0, atol=1e-6)
    x64, _ = data.tensors(dtype=torch.float64)
    assert x64.dtype == torch.float64
    item_x, item_y = data[4]
    torch.testing.assert_close(item_x, x[4])
    torch.testing.assert_close(item_y, y[4])
    small = data.subset(5)
    assert len(small) == 5 and small.split == "test"
    with pytest.raises(ValueError, match="subset size"):
        data.subset(N_TEST + 1)
