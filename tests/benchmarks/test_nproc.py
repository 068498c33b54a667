"""``taskbalance run --nproc N``: a 2-process run equals the 1-process run to float tolerance, only rank 0 writes,
a resume continues on N processes, and a bad N is one line.

The equality run is MultiMNIST built from fixture digits (the real construction, small splits) with dropout off:
N ranks draw dropout masks per shard, which cannot reproduce one process's masks for the whole batch.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from taskbalance import cli
from taskbalance.benchmarks.base import MultiTaskModel, Split, TrainingProtocol
from taskbalance.benchmarks.batches import TensorBatches, shard_bounds
from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.datasets.multimnist import MultiMNIST
from taskbalance.benchmarks.models.multilenet import MultiLeNet
from taskbalance.benchmarks.multimnist import MultiMNISTBenchmark
from taskbalance.benchmarks.runner.compare import RunResults, run
from taskbalance.benchmarks.runner.fingerprint import ResumeError
from taskbalance.benchmarks.runner.training import Job
from tests.benchmarks.fixtures import glyph_images, write_idx_dir
from tests.benchmarks.runner.tiny import Killed, TinyBenchmark

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two processes need two CPUs")

METHODS = ["ew", "igbv1", "nashmtl"]
#: relative tolerance of the 2-process run against the 1-process run (float32 sums split in two, see test)
RTOL = 1e-4
#: set in a rank's environment once its audit hook guards a folder
_GUARDED = "TASKBALANCE_TEST_GUARDED"
_TIMING = {"time_s", "balancing_overhead_s", "time_per_epoch_s", "balancing_overhead_s_per_step"}


def refuse_writes_under(root: str) -> Callable[[str, tuple[Any, ...]], None]:
    """An audit hook that raises on any file created, written, renamed or removed under ``root``."""
    events = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.unlink", "os.rmdir"}

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if (event != "open" and event not in events) or not args or not isinstance(args[0], (str, os.PathLike)):
            return
        if not os.fspath(args[0]).startswith(root):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            reading = not (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if reading and not (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                return
        raise PermissionError(f"rank {os.environ.get('RANK')}: {event} {args[0]}")

    return hook


class SmallMultiMNIST(MultiMNISTBenchmark):
    """MultiMNIST of fixture digits: 501 training samples in batches of 64 (the last, 53, shared 26/27 on two
    ranks), 256 validation and test samples, two epochs, MultiLeNet without dropout."""

    def __init__(self, data_dir: Path, guarded: Path) -> None:
        super().__init__("quick", str(data_dir))
        self.protocol = TrainingProtocol("small", 2, 64, 1e-3, "fixture digits", reduced=True, train_size=501)
        self.guarded = str(guarded)

    def split_data(self, split: Split) -> MultiMNIST:
        data = super().split_data(split)
        return data if split == "train" else data.subset(256)

    def model(self) -> MultiTaskModel:
        """The model, built first thing in every run: on a rank other than 0 (the launcher has set RANK by then),
        the process is forbidden writes under ``guarded`` from here on."""
        if os.environ.get("RANK", "0") != "0" and os.environ.get(_GUARDED) != self.guarded:
            os.environ[_GUARDED] = self.guarded
            sys.addaudithook(refuse_writes_under(self.guarded))
        return cast(MultiTaskModel, MultiLeNet(n_tasks=2, n_classes=10, dropout=0.0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, RunResults, RunResults]]:
    root = tmp_path_factory.mktemp("nproc")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10_600), ("test", 256)):  # 10,000 of the training digits go to validation
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx_dir(root / "mnist", split, glyph_images(labels), labels)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.ENV_VAR, str(root / "cache"))  # shared: both runs read the same baselines
        one = run(SmallMultiMNIST(root / "mnist", root), METHODS, [0], root / "one", threads=1, progress=False)
        two = run(SmallMultiMNIST(root / "mnist", root), METHODS, [0], root / "two", threads=1, progress=False, nproc=2)
        yield root, one, two


def _close(a: Any, b: Any, where: str) -> None:
    """Equal structure; numbers within RTOL (timings skipped)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            if key not in _TIMING:
                _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=RTOL, abs=1e-9), where
    else:
        assert a == b, where


def test_two_processes_equal_one_to_float_tolerance(runs: tuple[Path, RunResults, RunResults]) -> None:
    root, one, two = runs
    _close(one.results, two.results, "results.json")
    trained = 0.0
    for method in METHODS:
        a, b = root / "one" / "runs" / method / "seed0", root / "two" / "runs" / method / "seed0"
        history_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
        history_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
        _close(history_a, history_b, f"{method} metrics.jsonl")
        rows_a = list(csv.reader((a / "weights.csv").open()))
        rows_b = list(csv.reader((b / "weights.csv").open()))
        assert [r[:2] for r in rows_a] == [r[:2] for r in rows_b]
        np.testing.assert_allclose(np.array(rows_a[1:], float), np.array(rows_b[1:], float), rtol=RTOL)
        model_a = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
        model_b = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
        start = MultiLeNet(2, 10, 0.0)
        for name, value in model_a.items():
            torch.testing.assert_close(model_b[name], value, rtol=RTOL, atol=1e-6)
            trained = max(trained, float((value - start.state_dict()[name]).abs().max()))
    assert trained > 1e-3  # the runs moved the weights: equal models are not two untouched initialisations
    assert json.loads((root / "two" / "config.json").read_text())["fingerprint"]["nproc"] == 2


def test_only_rank_0_wrote_the_run_folder(runs: tuple[Path, RunResults, RunResults]) -> None:
    root, _, _ = runs
    files_one = sorted(p.relative_to(root / "one") for p in (root / "one").rglob("*") if p.is_file())
    files_two = sorted(p.relative_to(root / "two") for p in (root / "two").rglob("*") if p.is_file())
    assert files_one == files_two  # nothing else (no leftover temporary files)
    # rank 1 ran under refuse_writes_under(root) (any write there would have failed the run); the hook works:
    hook = refuse_writes_under(str(root))
    with pytest.raises(PermissionError):
        hook("open", (str(root / "two" / "x"), "w", os.O_WRONLY))
    with pytest.raises(PermissionError):
        hook("os.replace", (str(root / "two" / "a"), str(root / "two" / "b")))
    hook("open", (str(root / "two" / "config.json"), "r", os.O_RDONLY))


def test_a_resume_with_another_nproc_is_refused(runs: tuple[Path, RunResults, RunResults]) -> None:
    root, _, _ = runs
    with pytest.raises(ResumeError, match=r"nproc: 1 → 2"):
        run(SmallMultiMNIST(root / "mnist", root), METHODS, [0], root / "one", resume=True, progress=False, nproc=2)


def test_shards_split_each_batch_contiguously_and_cover_it() -> None:
    inputs = torch.arange(21.0)
    for world in (1, 2, 3, 4):
        seen = []
        for rank in range(world):
            loader = TensorBatches(inputs, inputs, 8, shuffle=True, generator=torch.Generator().manual_seed(5))
            seen.append([(s.batch[0].tolist(), s.size, s.total) for s in loader.shards(rank, world)])
        whole = [b.tolist() for b, _ in TensorBatches(inputs, inputs, 8, True, torch.Generator().manual_seed(5))]
        for step, batch in enumerate(whole):
            assert [x for r in range(world) for x in seen[r][step][0]] == batch
            sizes = [seen[r][step][1] for r in range(world)]
            assert max(sizes) - min(sizes) <= 1 and all(seen[r][step][2] == len(batch) for r in range(world))
    assert [shard_bounds(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]


def _untimed(line: str) -> dict[str, Any]:
    return {k: v for k, v in json.loads(line).items() if k not in _TIMING}


def stop_igbv1(job: Job, epoch: int, step: int) -> None:
    """Kill the igbv1 run in its second epoch (on every rank, as a crash of the machine would)."""
    if job.spec == "igbv1" and (epoch, step) == (2, 2):
        raise Killed


@pytest.mark.slow
def test_killed_on_two_processes_then_resumed_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TinyBenchmark has dropout: each rank's own RNG state must come back from the checkpoint."""
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    methods = ["ew", "igbv1"]
    run(TinyBenchmark(), methods, [1], tmp_path / "a", threads=1, progress=False, nproc=2)
    with pytest.raises(Killed):
        run(TinyBenchmark(), methods, [1], tmp_path / "b", threads=1, progress=False, nproc=2, on_step=stop_igbv1)
    killed = tmp_path / "b" / "runs" / "igbv1" / "seed1"
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 1 and not (killed / "final.json").exists()
    run(TinyBenchmark(), methods, [1], tmp_path / "b", resume=True, threads=1, progress=False, nproc=2)
    for method in methods:
        a, b = tmp_path / "a" / "runs" / method / "seed1", tmp_path / "b" / "runs" / method / "seed1"
        history = [_untimed(line) for line in (a / "metrics.jsonl").open()]
        assert history == [_untimed(line) for line in (b / "metrics.jsonl").open()], method  # bit for bit
        assert (a / "weights.csv").read_text() == (b / "weights.csv").read_text()


def test_bad_nproc_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    too_many = str((os.cpu_count() or 1) + 1)
    assert cli.main(["run", "multimnist", "--nproc", too_many, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--nproc {too_many} exceeds this machine's" in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "multimnist", "--nproc", "0", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nproc: expected a positive integer, got 0" in err
    assert not out.exists()


def test_nproc_must_divide_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    bench = TinyBenchmark()
    bench.protocol = TrainingProtocol("odd", 1, 15, 1e-2, "odd batch", reduced=True)
    with pytest.raises(ValueError, match="does not divide the global batch of 15 samples"):
        run(bench, ["ew"], [0], tmp_path / "out", progress=False, nproc=2)
    assert not (tmp_path / "out").exists()
