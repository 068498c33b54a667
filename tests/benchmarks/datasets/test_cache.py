"""The cache directory and atomic writes: nothing half-written survives a failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from taskbalance.benchmarks.datasets import cache


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache.cache_dir() == tmp_path / "cache"
    assert cache.cache_dir().is_dir()
    monkeypatch.delenv(cache.ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "taskbalance"


def test_failure_mid_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "data.bin"
    with pytest.raises(RuntimeError, match="crash"), cache.atomic_open(target) as handle:
        handle.write(b"half of the data")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temporary file is gone too


def test_failure_mid_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), cache.atomic_open(target) as handle:
        handle.write(b"new but incomplete")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_save_failure_in_serialisation_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "arrays.npz"
    with pytest.raises(ValueError):
        cache.save_arrays(target, {"ok": np.arange(3), "bad": np.array([object()], dtype=object)})
    assert list(tmp_path.iterdir()) == []


def test_arrays_round_trip(tmp_path: Path) -> None:
    arrays = {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": np.array([1.5, -2.0])}
    cache.save_arrays(tmp_path / "x.npz", arrays)
    loaded = cache.load_arrays(tmp_path / "x.npz")
    assert loaded.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype


def test_cached_arrays_builds_once_and_rebuilds_a_corrupt_file() -> None:
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"v": np.arange(4)}

    first = cache.cached_arrays("thing.npz", build)
    second = cache.cached_arrays("thing.npz", build)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["v"], second["v"])
    (cache.cache_dir() / "thing.npz").write_bytes(b"truncated garbage")
    np.testing.assert_array_equal(cache.cached_arrays("thing.npz", build)["v"], np.arange(4))
    assert len(calls) == 2


def test_cache_disabled_neither_reads_nor_writes() -> None:
    cache.cached_arrays("off.npz", lambda: {"v": np.zeros(1)}, enabled=False)
    assert not (cache.cache_dir() / "off.npz").exists()
