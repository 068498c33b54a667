"""The runner on a tiny synthetic benchmark: folder format, Δm/rank results, selection, seeding, errors, and
resume after a kill mid-epoch ending bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.metrics.delta_m import delta_m
from taskbalance.benchmarks.runner.checkpoint import CheckpointError
from taskbalance.benchmarks.runner.compare import RunResults, parse_seeds, run, schedule_notes
from taskbalance.benchmarks.runner.training import Job, best_epoch

from .tiny import EPOCHS, Killed, TinyBenchmark, kill_at


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


def _strip_times(record: dict[str, Any]) -> dict[str, Any]:
    timing = {"time_s", "balancing_overhead_s", "time_per_epoch_s", "balancing_overhead_s_per_step"}
    return {k: v for k, v in record.items() if k not in timing}


def _run_files(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], str, dict[str, Tensor]]:
    final = _strip_times(json.loads((run_dir / "final.json").read_text()))
    history = [_strip_times(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = (run_dir / "weights.csv").read_text()
    model = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    return final, history, weights, model


METHODS = ["ew", "famo", "rlw", "uw", "igbv1+nashmtl"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, RunResults]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.ENV_VAR, str(root / "cache"))
        yield root / "run", run(TinyBenchmark(), METHODS, seeds=[3], out_dir=root / "run", threads=1, progress=False)


@pytest.mark.parametrize(
    ("spec", "task"),
    [("igbv1+nashmtl", None), ("famo", None), ("uw", None), ("rlw", None), ("stl", 1)],
    ids=["igbv1+nashmtl", "famo", "uw", "rlw", "stl"],
)
def test_killed_mid_epoch_then_resumed_equals_uninterrupted(
    uninterrupted: tuple[Path, RunResults], tmp_path: Path, spec: str, task: int | None
) -> None:
    reference_dir, reference = uninterrupted
    out = tmp_path / "b"  # with this test's own cache: the killed STL run must not find a cached one
    with pytest.raises(Killed):
        run(TinyBenchmark(), METHODS, [3], out, threads=1, progress=False, on_step=kill_at(spec, 2, 3, task))
    killed_dir = out / "stl" / "b" / "seed3" if task is not None else out / "runs" / spec.replace("+", "__") / "seed3"
    if task is None:
        assert len((killed_dir / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 done, epoch 2 lost
        assert not (killed_dir / "final.json").exists()
    resumed = run(TinyBenchmark(), METHODS, [3], out, resume=True, threads=1, progress=False)

    for sub in ["stl/a/seed3", "stl/b/seed3", *(f"runs/{m.replace('+', '__')}/seed3" for m in METHODS)]:
        final_a, history_a, weights_a, model_a = _run_files(reference_dir / sub)
        final_b, history_b, weights_b, model_b = _run_files(out / sub)
        assert final_a == final_b, sub
        assert history_a == history_b, sub
        assert weights_a == weights_b, sub
        assert model_a.keys() == model_b.keys()
        for name in model_a:
            assert torch.equal(model_a[name], model_b[name]), (sub, name)
    for spec_ in METHODS:
        assert reference.results["methods"][spec_]["delta_m"] == resumed.results["methods"][spec_]["delta_m"]


def test_run_folder_format_and_results(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(TinyBenchmark(), ["ew", "igbv1"], seeds=2, out_dir=out, threads=1, progress=False, command="cmd")
    config = json.loads((out / "config.json").read_text())
    for key in ("benchmark", "protocol", "protocol_description", "reduced", "methods", "seeds", "epochs",
                "batch_size", "lr", "device", "command", "versions", "tasks", "metrics"):  # fmt: skip
        assert key in config, key
    assert config["methods"] == ["ew", "igbv1"] and config["seeds"] == [0, 1] and config["command"] == "cmd"
    assert config["metrics"][1] == {"name": "mse/b", "task": "b", "higher_is_better": False}

    run_dir = out / "runs" / "igbv1" / "seed1"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert set(lines[0]) >= {"epoch", "time_s", "lr", "train", "val", "test"}
    assert set(lines[0]["train"]) == {"loss/a", "loss/b"} and set(lines[0]["val"]) == {"acc/a", "mse/b"}
    rows = list(csv.reader((run_dir / "weights.csv").read_text().splitlines()))
    assert rows[0] == ["step", "epoch", "a", "b"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 13))  # 4 steps per epoch, all sampled
    assert [int(r[1]) for r in rows[1:]] == [1] * 4 + [2] * 4 + [3] * 4
    assert all(math.isclose(float(r[2]) + float(r[3]), 2.0, rel_tol=1e-5) for r in rows[1:])  # IGBv1: K·softmax

    # the STL baseline of a task reports that task's metrics only and trains with weight 1 on it
    stl_final = json.loads((out / "stl" / "a" / "seed0" / "final.json").read_text())
    assert stl_final["method"] == "stl" and stl_final["task"] == "a" and set(stl_final["test"]) == {"acc/a"}
    stl_rows = list(csv.reader((out / "stl" / "a" / "seed0" / "weights.csv").read_text().splitlines()))
    assert {tuple(r[2:]) for r in stl_rows[1:]} == {("1.0", "0.0")}

    # results: Δm per seed against the mean STL test metrics, recomputed by hand from the final.json files
    directions = {"acc/a": True, "mse/b": False}
    stl = {
        name: sum(json.loads((out / "stl" / t / f"seed{s}" / "final.json").read_text())["test"][name] for s in (0, 1))
        / 2
        for t, name in (("a", "acc/a"), ("b", "mse/b"))
    }
    results = json.loads((out / "results.json").read_text())
    assert results["stl"]["mean"] == pytest.approx(stl)
    for spec in ("ew", "igbv1"):
        finals = [json.loads((out / "runs" / spec / f"seed{s}" / "final.json").read_text()) for s in (0, 1)]
        expected = [delta_m(f["test"], stl, directions) for f in finals]
        assert results["methods"][spec]["delta_m"]["values"] == pytest.approx(expected)
        assert results["methods"][spec]["delta_m"]["mean"] == pytest.approx(sum(expected) / 2)
        assert results["methods"][spec]["metrics"]["acc/a"]["values"] == [f["test"]["acc/a"] for f in finals]
    ranks = sorted(results["methods"][s]["mean_rank"] for s in ("ew", "igbv1"))
    assert sum(ranks) == pytest.approx(3.0)  # two methods, ranks 1 and 2 per metric
    table_rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [(r["method"], r["seed"]) for r in table_rows] == [
        ("stl", "0"), ("stl", "1"), ("ew", "0"), ("ew", "1"), ("igbv1", "0"), ("igbv1", "1")
    ]  # fmt: skip
    assert "REDUCED protocol" in result.table and "| STL |" in result.table and "| igbv1 |" in result.table


def test_every_run_of_a_seed_has_the_same_initialisation_and_batches(tmp_path: Path) -> None:
    bench = TinyBenchmark()
    run(bench, ["ew", "rlw"], seeds=[0, 1], out_dir=tmp_path / "run", threads=1, progress=False)
    # job order: stl a, stl b of seed 0, then of seed 1; then ew, rlw of seed 0, then of seed 1
    states, batches = bench.initial_states, bench.first_batches
    assert len(states) == 8 and len(batches) == 8
    for block in ([0, 1, 4, 5], [2, 3, 6, 7]):
        for i in block:
            assert all(torch.equal(states[i][k], states[block[0]][k]) for k in states[block[0]])
            assert torch.equal(batches[i], batches[block[0]])
    assert not torch.equal(states[0]["encoder.0.weight"], states[2]["encoder.0.weight"])
    assert not torch.equal(batches[0], batches[2])


def test_resume_skips_finished_runs_and_reuses_cached_baselines(tmp_path: Path) -> None:
    run(TinyBenchmark(), ["ew"], seeds=1, out_dir=tmp_path / "run", threads=1, progress=False)

    def fail(job: Job, epoch: int, step: int) -> None:
        raise AssertionError(f"{job} trained again")

    run(TinyBenchmark(), ["ew"], seeds=1, out_dir=tmp_path / "run", resume=True, progress=False, on_step=fail)
    # another folder with the same protocol reuses the cached single-task baselines, and trains only the method
    trained: list[str] = []
    run(TinyBenchmark(), ["ew"], seeds=1, out_dir=tmp_path / "other", progress=False,
        on_step=lambda job, e, s: trained.append(job.spec))  # fmt: skip
    assert set(trained) == {"ew"}
    assert (tmp_path / "other" / "stl" / "b" / "seed0" / "final.json").exists()


def test_best_epoch_rule() -> None:
    directions = {"acc": True, "err": False}
    history = [
        {"epoch": 1, "val": {"acc": 50.0, "err": 2.0}},
        {"epoch": 2, "val": {"acc": 60.0, "err": 2.0}},  # Δm vs ref (60, 1): (0 + 100)/2 = 50
        {"epoch": 3, "val": {"acc": 54.0, "err": 1.0}},  # (10 + 0)/2 = 5: the best
        {"epoch": 4, "val": {"acc": 54.0, "err": 1.0}},  # a tie goes to the earlier epoch
    ]
    assert best_epoch(history, directions, {"acc": 60.0, "err": 1.0})["epoch"] == 3
    # without a reference (STL runs) the first epoch is the reference: epoch 3 is then +4 % acc and −50 % err
    assert best_epoch(history, directions, None)["epoch"] == 3
    assert best_epoch(history[:2], {"acc": True}, None)["epoch"] == 2  # one metric: simply its best value
    with pytest.raises(ValueError, match="no finished epoch"):
        best_epoch([], directions, None)


def test_errors_are_clear(tmp_path: Path) -> None:
    bench = TinyBenchmark()
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; choose from multimnist"):
        run("nope", ["ew"], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="method 'nosuch'"):
        run(bench, ["ew", "nosuch"], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="listed twice"):
        run(bench, ["ew", "ew"], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        run(bench, ["ew"], out_dir=tmp_path / "x", epochs=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            run(bench, ["ew"], out_dir=tmp_path / "x", device="cuda")
    with pytest.raises(ValueError, match="protocol"):
        run(bench, ["ew"], out_dir=tmp_path / "x", protocol="paper")
    assert parse_seeds(3) == [0, 1, 2] and parse_seeds([5, 2]) == [5, 2]
    for bad in (0, [], [1, 1], [-1], True):
        with pytest.raises(ValueError):
            parse_seeds(bad)  # type: ignore[arg-type]

    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        run(bench, ["ew"], out_dir=tmp_path / "file")
    out = tmp_path / "done"
    run(bench, ["ew"], out_dir=out, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run(TinyBenchmark(), ["ew"], out_dir=out, progress=False)
    with pytest.raises(ValueError, match=r"different settings.*epochs"):
        run(TinyBenchmark(), ["ew"], out_dir=out, epochs=2, resume=True, progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(TinyBenchmark(), ["ew"], out_dir=out, progress=False, on_step=kill_at("ew", 2, 1))
    checkpoint = out / "runs" / "ew" / "seed0" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(f"delete {checkpoint}")):
        run(TinyBenchmark(), ["ew"], out_dir=out, resume=True, progress=False)
    # a checkpoint of another run (copied by hand) is refused rather than silently continued
    other = torch.load(out / "stl" / "a" / "seed0" / "checkpoint.pt", weights_only=True)
    torch.save(other, checkpoint)
    with pytest.raises(CheckpointError, match="belongs to"):
        run(TinyBenchmark(), ["ew"], out_dir=out, resume=True, progress=False)
    checkpoint.unlink()  # the fix the messages give: the run restarts from its first epoch
    run(TinyBenchmark(), ["ew"], out_dir=out, resume=True, progress=False)
    final_path = checkpoint.parent / "final.json"
    final = json.loads(final_path.read_text())
    assert final["epochs"] == EPOCHS
    # a truncated final.json is rebuilt from the finished checkpoint, without training again
    final_path.write_text(final_path.read_text()[:20])

    def fail(job: Job, epoch: int, step: int) -> None:
        raise AssertionError("trained again")

    run(TinyBenchmark(), ["ew"], out_dir=out, resume=True, progress=False, on_step=fail)
    assert _strip_times(json.loads(final_path.read_text())) == _strip_times(final)


def test_schedule_notes_flag_methods_that_cannot_act_in_the_epochs_given() -> None:
    assert schedule_notes(["ew", "igbv1", "igbv2"], 2, 6) == []
    notes = schedule_notes(["ew", "igbv1", "igbv2+cagrad"], 2, 5)
    assert len(notes) == 1 and notes[0].startswith("igbv2+cagrad: its policy picks the weights from epoch 6")
    assert schedule_notes(["igbv1+nashmtl"], 2, 2)[0].startswith("igbv1+nashmtl: its gap weights start at epoch 3")
    assert schedule_notes(["igbv1"], 2, 3) == []
