"""The command line: help texts, `run` errors and a tiny end-to-end run, `report`, and `python -m taskbalance`."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
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
def mnist_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fixture digits and a two-epoch protocol small enough for a test."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 20)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx_dir(tmp_path / "mnist", split, glyph_images(labels), labels)
    monkeypatch.setattr(mb, "VAL_SIZE", 10)
    monkeypatch.setitem(mb.PROTOCOLS, "quick", TrainingProtocol("quick", 2, 8, 1e-2, "fixture", True, 24))
    return tmp_path / "mnist"


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_texts_are_complete(capsys: pytest.CaptureFixture[str]) -> None:
    top = _help(["--help"], capsys)
    for command in ("methods", "run", "report"):
        assert command in top
    run_help = _help(["run", "--help"], capsys)
    for option in ("--methods", "--seeds", "--epochs", "--protocol", "--device", "--out", "--data-dir", "--resume",
                   "--threads", "--no-progress", "multimnist", "qm9", "igbv1+nashmtl", "Δm% against"):  # fmt: skip
        assert option in run_help, option
    report_help = _help(["report", "--help"], capsys)
    assert "DIR" in report_help and "--out" in report_help and "%%" not in report_help + run_help
    assert "methods" in _help(["methods", "--help"], capsys)


def test_python_dash_m_works() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "taskbalance", "run", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--resume" in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "mnist"], "unknown benchmark 'mnist'; choose from multimnist, multifashion"),
        (["run", "multimnist", "--methods", "ew,nosuch"], "method 'nosuch'"),
        (["run", "multimnist", "--protocol", "fast"], "no protocol 'fast'; choose from paper, quick"),
        (["run", "multimnist", "--methods", ""], "no methods given"),
    ],
)
def test_run_errors_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_bad_numbers_are_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["run", "multimnist", "--epochs", "0"], ["run", "multimnist", "--seeds", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "expected a count (3) or a list of seeds" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["run", "multimnist", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_run_then_resume_then_report(mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["run", "multimnist", "--methods", "ew,igbv1", "--seeds", "0,2", "--data-dir", str(mnist_dir)]
    argv += ["--out", str(out), "--threads", "1", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| ew |" in printed and "| igbv1 |" in printed and "REDUCED" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["seeds"] == [0, 2] and config["command"] == "taskbalance " + shlex.join(argv)
    assert cli.main(argv) == 2  # the folder exists: the error says to --resume
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*argv, "--resume"]) == 0
    capsys.readouterr()

    # in a subprocess, as a user runs it (and so that this process does not keep the plotting module imported)
    done = subprocess.run(
        [sys.executable, "-m", "taskbalance", "report", str(out), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "| igbv1 |" in done.stdout.replace("**", "")
    assert str(tmp_path / "report" / "report.md") in done.stdout


def test_report_needs_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
