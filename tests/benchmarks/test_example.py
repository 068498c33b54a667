"""The MultiMNIST comparison example, end to end on fixture data (the real data is never required)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from taskbalance.benchmarks import MultiMNIST
from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.datasets import multimnist as mm
from tests.benchmarks.fixtures import glyph_images, write_idx_dir

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "multimnist_compare.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("multimnist_compare", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fixture_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, example: ModuleType) -> None:
    """Point the example's loader at small IDX fixtures (60 train / 100 test glyph digits)."""
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 100)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx_dir(tmp_path / "mnist", split, glyph_images(labels), labels)

    def load(dataset: mm.DatasetName, split: mm.SplitName, **kwargs: Any) -> MultiMNIST:
        return mm.load_multimnist(dataset, split, val_size=10, mnist_path=tmp_path / "mnist", **kwargs)

    monkeypatch.setattr(example, "load_multimnist", load)


ARGS = ["--epochs", "2", "--train-size", "40", "--batch-size", "16", "--threads", "1"]


def _table_rows(output: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_runs_end_to_end_and_is_deterministic(
    example: ModuleType, fixture_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert example.main([*ARGS, "--methods", "ew,famo,rlw,igbv1+pcgrad"]) == 0
    first = capsys.readouterr().out
    rows = _table_rows(first)
    assert list(rows) == ["ew", "famo", "rlw", "igbv1+pcgrad"]
    assert rows["ew"][3] == "+0.00"  # Δm of EW against itself
    assert "epoch 2/2" in first and "reduced protocol" in first
    assert example.main([*ARGS, "--methods", "ew,famo,rlw,igbv1+pcgrad"]) == 0
    again = capsys.readouterr().out
    assert {m: r[:4] for m, r in _table_rows(again).items()} == {m: r[:4] for m, r in rows.items()}
    assert _progress(again) == _progress(first)  # losses, weights, train accuracy of every epoch


def _progress(output: str) -> list[str]:
    """The per-epoch lines without their timing."""
    return [line.rsplit("  ", 1)[0] for line in output.splitlines() if " epoch " in line]


def test_missing_modules_are_skipped_with_a_note(
    example: ModuleType, fixture_data: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_make = example.tb.make

    def make(spec: str, n_tasks: int, **options: Any) -> Any:
        if spec == "rlw":
            raise ModuleNotFoundError("No module named 'taskbalance.gradient_balancing.future'")
        return real_make(spec, n_tasks, **options)

    monkeypatch.setattr(example.tb, "make", make)
    assert example.main([*ARGS, "--epochs", "1", "--methods", "ew,rlw"]) == 0
    output = capsys.readouterr().out
    assert "skipped, not importable yet: rlw" in output
    assert list(_table_rows(output)) == ["ew"]


def test_igbv2_with_too_few_epochs_is_flagged(
    example: ModuleType, fixture_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert example.main([*ARGS, "--epochs", "1", "--methods", "igbv2"]) == 0
    output = capsys.readouterr().out
    assert "only uses random weights" in output
    assert _table_rows(output)["igbv2"][3] == "n/a"  # no EW to compare against


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--methods", " , "], "--methods is empty"),
        (["--lr", "0"], "--lr must be positive"),
    ],
)
def test_bad_arguments(example: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert message in capsys.readouterr().err


def test_unknown_method_and_oversized_subset_are_errors(
    example: ModuleType, fixture_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert example.main([*ARGS, "--methods", "ew,notamethod"]) == 2
    assert "unknown method 'notamethod'" in capsys.readouterr().err
    assert example.main([*ARGS, "--train-size", "1000", "--methods", "ew"]) == 2
    assert "exceeds the 50 training samples" in capsys.readouterr().err


def test_delta_m_hand_computed(example: ModuleType) -> None:
    # accuracies 90 → 99 (+10%) and 80 → 72 (−10%): Δm = −(0.1 − 0.1)/2 · 100 = 0; 90 → 99 alone: −10
    assert example.delta_m([99.0, 72.0], [90.0, 80.0]) == pytest.approx(0.0)
    assert example.delta_m([99.0, 80.0], [90.0, 80.0]) == pytest.approx(-5.0)
    assert np.isnan(example.delta_m([10.0, 5.0], [10.0, 0.0]))
