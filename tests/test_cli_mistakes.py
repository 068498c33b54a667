"""Every user mistake on the command line ends in one line on stderr and a non-zero status, never a traceback, and
before any work: the speed benchmark's runner and the trainer fail the test if they are reached. Bugs (any other
exception) keep their traceback; Ctrl-C and a closed stdout end quietly."""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from taskbalance import cli, speed
from taskbalance.benchmarks.datasets.mnist import DataSourceError
from taskbalance.benchmarks.runner import compare
from taskbalance.benchmarks.runner.checkpoint import CheckpointError
from taskbalance.speed.report import Row

RUN_TRAINER = compare.RunTrainer


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a mistake must be refused before any work starts")


@pytest.fixture(autouse=True)
def _no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No benchmark step, no training; CUDA absent even where it is installed; run in an empty folder."""
    monkeypatch.setattr(speed, "run_case", _never)
    monkeypatch.setattr(compare, "RunTrainer", _never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()


def one_line_failure(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``argv`` in-process; assert a non-zero status and exactly one non-empty line on stderr; return it."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code  # type: ignore[assignment]
    except KeyboardInterrupt:  # would stop the whole test session
        pytest.fail("Ctrl-C escaped main()")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status not in (0, None), err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


SPEED = ["bench", "speed", "--no-torchjd"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([*SPEED, "--device", "foo"], "unknown device 'foo'"),
        ([*SPEED, "--device", "cuda"], "CUDA is not available"),
        ([*SPEED, "--device", "cuda:1"], "CUDA is not available"),
        ([*SPEED, "--device", "meta"], "device 'meta' cannot train a model"),
        ([*SPEED, "--methods", "nosuch"], "unknown method 'nosuch'; available: aligned_mtl"),
        ([*SPEED, "--methods", "upgrad,nosuch"], "unknown method 'nosuch'"),
        ([*SPEED, "--methods", "cagrad[c=abc]"], "option c='abc' of cagrad: expected a number"),
        ([*SPEED, "--methods", "uw[log_losses=maybe]"], "expected a boolean"),
        ([*SPEED, "--methods", "uw[nosuch=1]"], "option 'nosuch' is not accepted"),
        ([*SPEED, "--methods", "cagrad[c=0.5]"], "at its defaults, not cagrad[c=0.5]; choose from ew, si"),
        ([*SPEED, "--methods", "igbv1+nashmtl"], "not igbv1+nashmtl"),
        ([*SPEED, "--methods", "upgrad,cagrad[c=0.5,max_norm=1]"], "not cagrad[c=0.5,max_norm=1"),
        ([*SPEED, "--methods", ""], "no methods given"),
        ([*SPEED, "--methods", "mgda,mgda"], "listed twice"),
        ([*SPEED, "--cases", ""], "no cases given"),
        ([*SPEED, "--cases", "cnn,nope"], "unknown case(s) nope; choose from multilenet"),
        ([*SPEED, "--repeats", "0"], "--repeats: expected a positive integer, got 0"),
        ([*SPEED, "--repeats", "x"], "--repeats: expected a positive integer, got 'x'"),
        ([*SPEED, "--threads", "0"], "--threads: expected a positive integer"),
        ([*SPEED, "--threads", "1.5"], "--threads: expected a positive integer"),
        ([*SPEED, "--threads", "100000"], "--threads: expected at most"),
        ([*SPEED, "--out", "empty"], "cannot write empty: Is a directory"),
        ([*SPEED, "--out", "a_file/speed.md"], "cannot write a_file/speed.md: File exists (a_file)"),
        ([*SPEED, "--nosuch"], "unrecognized arguments: --nosuch"),
        (["bench"], "required: BENCH"),
        (["bench", "nosuch"], "invalid choice: 'nosuch'"),
    ],
)
def test_bench_speed_mistakes(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_failure(argv, capsys)
    assert expected in line
    assert line.startswith("taskbalance")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_bench_speed_refuses_a_read_only_out_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert "Permission denied" in one_line_failure([*SPEED, "--out", str(locked / "speed.md")], capsys)
    finally:
        locked.chmod(0o755)


def test_bench_speed_refuses_an_unwritable_out_as_root_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)  # what a read-only folder does for a user who is not root
    line = one_line_failure([*SPEED, "--out", "empty/speed.md"], capsys)
    assert line == "taskbalance bench speed: error: cannot write empty/speed.md: Permission denied"


def test_bench_speed_out_is_probed_without_leaving_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "speed.md"
    one_line_failure([*SPEED, "--methods", "nosuch", "--out", str(out)], capsys)
    assert not out.parent.exists()  # the arguments are checked first: nothing is created for a refused command
    speed.check_writable(out)
    assert out.parent.is_dir() and not out.exists()


def test_bench_speed_passes_the_specs_and_writes_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def one_row(name: str, device: torch.device, repeats: int, with_torchjd: bool, methods: set[str]) -> Any:
        seen.update(name=name, device=device, methods=methods)
        return "a model", [Row(name, 2, "ew", "ew", 1.0, 1.0, 1.0, vs_torchjd=math.nan, solve_ms=math.nan, peak_mb=0.0)]

    monkeypatch.setattr(speed, "run_case", one_row)
    out = tmp_path / "new" / "speed.md"
    argv = [*SPEED, "--cases", "cnn", "--methods", "upgrad,UW", "--out", str(out)]
    assert cli.main(argv) == 0
    assert seen == {"name": "cnn", "device": torch.device("cpu"), "methods": {"upgrad", "uw"}}
    printed = capsys.readouterr().out
    assert out.read_text().startswith("torch ") and "## cnn: a model" in out.read_text()
    assert out.read_text() in printed and f"written: {out}" in printed


def test_speed_run_checks_every_argument_first() -> None:
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        speed.run(["cnn"], "cpu", 0, with_torchjd=False)
    assert speed.check_methods(["UPGRAD", "ew"]) == {"upgrad", "ew"}


RUN = ["run", "multimnist", "--no-progress", "--out", "out"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run"], "required: BENCHMARK"),
        (["run", "nosuch"], "unknown benchmark 'nosuch'"),
        ([*RUN, "--seeds", "0"], "the number of seeds must be >= 1"),
        ([*RUN, "--seeds", "-1"], "the number of seeds must be >= 1"),
        ([*RUN, "--seeds", "x"], "--seeds: expected a count"),
        ([*RUN, "--seeds", ","], "no seeds given"),
        ([*RUN, "--seeds", "1,1"], "seeds must be distinct"),
        ([*RUN, "--seeds", "0,-2"], "seeds must be >= 0"),
        ([*RUN, "--seeds", "99999999999999999999"], "the number of seeds must be <="),
        ([*RUN, "--seeds", "99999999999999999999,"], "seeds must be <="),
        ([*RUN, "--device", "meta"], "device 'meta' cannot train a model"),
        ([*RUN, "--threads", "0"], "--threads: expected a positive integer"),
        ([*RUN, "--threads", "100000"], "--threads: expected at most"),
        ([*RUN, "--epochs", "-1"], "--epochs: expected a positive integer, got -1"),
        ([*RUN, "--epochs", "x"], "--epochs: expected a positive integer, got 'x'"),
        ([*RUN, "--methods", "nosuch"], "unknown method 'nosuch'"),
        ([*RUN, "--methods", ""], "no methods given"),
        ([*RUN, "--methods", "cagrad[c=abc]"], "expected a number"),
        ([*RUN, "--methods", "uw[nosuch=1]"], "option 'nosuch' is not accepted"),
        ([*RUN, "--device", "foo"], "unknown device 'foo'"),
        ([*RUN, "--device", "cuda"], "CUDA is not available"),
        ([*RUN, "--protocol", "nosuch"], "no protocol 'nosuch'"),
        ([*RUN, "--data-dir", "missing"], "is not a directory"),
        ([*RUN, "--data-dir", "a_file"], "is not a directory"),
        (["run", "multimnist", "--no-progress", "--out", "a_file"], "is a file, not a folder"),
    ],
)
def test_run_mistakes(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_failure(argv, capsys)
    assert expected in line
    assert line.startswith("taskbalance")


def test_run_on_an_empty_data_dir_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(compare, "RunTrainer", RUN_TRAINER)
    # refused before the progress bar starts (so with the bar on, too) and before the run folder is made
    argv = ["run", "multimnist", "--out", "out", "--data-dir", "empty"]
    assert one_line_failure(argv, capsys) == "taskbalance run: error: no data files in empty (data_dir)"
    assert not Path("out").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["report"], "required: DIR"),
        (["report", "missing"], "missing has no config.json"),
        (["report", "a_file"], "a_file has no config.json"),
        (["report", "empty"], "empty has no config.json"),
        ([], "required: COMMAND"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["methods", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_other_mistakes(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert expected in one_line_failure(argv, capsys)


def test_a_broken_config_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "config.json").write_text("{")
    assert "is not valid JSON" in one_line_failure(["report", "empty"], capsys)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad\nvalue"),
        FileNotFoundError(2, "No such file or directory"),
        ImportError("pip install 'taskbalance[bench]'"),
        DataSourceError("no data"),
        CheckpointError("corrupt checkpoint"),
        ValueError(),
    ],
)
def test_user_errors_are_one_line(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(_: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_methods", fail)
    line = one_line_failure(["methods"], capsys)
    assert line.startswith("taskbalance methods: error: ")
    assert line != "taskbalance methods: error: "


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("baseline"), TypeError("a bug")])
def test_bugs_keep_their_traceback(error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(_: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_methods", fail)
    with pytest.raises(type(error)):
        cli.main(["methods"])


def test_ctrl_c_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupt(*args: object, **kwargs: object) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_methods", interrupt)
    assert one_line_failure(["methods"], capsys) == "taskbalance methods: interrupted"
    monkeypatch.setattr(compare, "run", interrupt)
    assert "--out out --resume" in one_line_failure(RUN, capsys)
    monkeypatch.setattr(speed, "run", interrupt)
    assert one_line_failure(SPEED, capsys) == "taskbalance bench speed: interrupted"


def _with_closed_stdout(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m taskbalance argv`` writing into a pipe whose reader has gone (``taskbalance methods | head``)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "taskbalance", *argv], stdout=write, stderr=subprocess.PIPE, text=True, check=False
        )
    finally:
        os.close(write)


def test_a_closed_stdout_ends_quietly() -> None:
    done = _with_closed_stdout("methods")
    assert done.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit
    assert done.returncode == 141  # as a program stopped by SIGPIPE


def test_a_mistake_in_a_real_process_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "taskbalance", "bench", "speed", "--device", "foo"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == "taskbalance bench speed: error: unknown device 'foo' (e.g. cpu, cuda, cuda:1, mps)\n"
