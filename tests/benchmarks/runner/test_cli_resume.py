"""The resume guarantees as a user meets them on the command line: each refusal is one line on stderr, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from taskbalance import cli
from taskbalance.benchmarks import multimnist as mb
from taskbalance.benchmarks.base import TrainingProtocol
from taskbalance.benchmarks.datasets import cache
from tests.benchmarks.fixtures import glyph_images, write_idx_dir


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


@pytest.fixture
def two_mnist_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Two folders of fixture digits drawn with different seeds, and a two-epoch protocol small enough for a test."""
    for name, seed in (("a", 0), ("b", 1)):
        rng = np.random.default_rng(seed)
        for split, n in (("train", 50), ("test", 20)):
            labels = rng.integers(0, 10, n).astype(np.uint8)
            write_idx_dir(tmp_path / name, split, glyph_images(labels), labels)
    monkeypatch.setattr(mb, "VAL_SIZE", 10)
    monkeypatch.setitem(mb.PROTOCOLS, "quick", TrainingProtocol("quick", 2, 8, 1e-2, "fixture", True, 24))
    return tmp_path / "a", tmp_path / "b"


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_resume_on_other_data_is_refused(
    two_mnist_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = two_mnist_dirs
    out = tmp_path / "run"
    argv = ["run", "multimnist", "--methods", "ew", "--out", str(out), "--threads", "1", "--no-progress"]
    assert cli.main([*argv, "--data-dir", str(first)]) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--data-dir", str(second), "--resume"]) == 2
    err = _error_line(capsys)
    assert "the data differ from the run's (data_dir/" in err and "sha256" in err
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(first)


def test_failed_start_then_the_same_command_fails_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["run", "nyuv2", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli.main(argv) == 2
    first = _error_line(capsys)
    assert cli.main(argv) == 2
    assert _error_line(capsys) == first and "--resume" not in first
    assert not (tmp_path / "o").exists()


def test_hand_edited_files_are_one_line(
    two_mnist_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["run", "multimnist", "--methods", "ew,si", "--data-dir", str(two_mnist_dirs[0]), "--out", str(out)]
    argv += ["--threads", "1", "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    final = out / "runs" / "si" / "seed0" / "final.json"
    final.write_text('{"best_epoch": 1, "test": {"acc/left": "high"}}')
    assert cli.main(["report", str(out), "--out", str(tmp_path / "report")]) == 2
    assert str(final) in _error_line(capsys)
    assert cli.main([*argv[:3], "ew", *argv[4:], "--resume"]) == 2
    assert str(final) in _error_line(capsys)
    (out / "config.json").write_text('{"methods": "ew"}')
    for command in (["report", str(out)], [*argv, "--resume"]):
        assert cli.main(command) == 2
        assert str(out / "config.json") in _error_line(capsys)
