"""``taskbalance report`` on fixture run folders: the table's rows, numbers and bold marks, Δm, missing pieces,
and the plots (files written, embedded, skipped when their data is missing)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

from taskbalance.benchmarks.report.folder import load_run
from taskbalance.benchmarks.report.markdown import STL, table, table_rows, write_report
from tests.benchmarks.run_fixture import make_run_folder

STL_MEANS = {"left/acc": 96.0, "right/acc": 94.0, "left/ce": 0.20, "right/ce": 0.25}


def hand_delta_m(acc_l: float, acc_r: float, ce_l: float, ce_r: float) -> float:
    """Δm% of one seed against the fixture's STL means, written out term by term."""
    return (
        (96 - acc_l) / 96 * 100 + (94 - acc_r) / 94 * 100 + (ce_l - 0.20) / 0.20 * 100 + (ce_r - 0.25) / 0.25 * 100
    ) / 4


def cells(markdown: str) -> dict[str, dict[str, str]]:
    """The table as {row label: {column header: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        values = [c.strip() for c in line.strip("|").split("|")]
        rows[values[0]] = dict(zip(header[1:], values[1:], strict=True))
    return rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("report") / "run")


def test_rows_means_stds_and_delta_m(run_dir: Path) -> None:
    rows = {r.label: r for r in table_rows(load_run(run_dir))}
    assert list(rows) == [STL, "ew", "igbv1", "igbv1+nashmtl"]
    ew = rows["ew"]
    assert ew.metrics["left/acc"].mean == pytest.approx(95.0)
    assert ew.metrics["left/acc"].std == pytest.approx(1.0)  # sample std of 94, 95, 96
    assert ew.metrics["right/acc"].std == pytest.approx(2.0)
    assert ew.metrics["right/ce"].std == pytest.approx(0.0)
    for label, value in STL_MEANS.items():
        assert rows[STL].metrics[label].mean == pytest.approx(value)
    per_seed = [hand_delta_m(94, 90, 0.22, 0.30), hand_delta_m(95, 92, 0.24, 0.30), hand_delta_m(96, 94, 0.26, 0.30)]
    assert ew.delta_m_per_seed == pytest.approx(per_seed)
    assert ew.delta_m is not None
    assert ew.delta_m.mean == pytest.approx(sum(per_seed) / 3)
    mean = sum(per_seed) / 3
    assert ew.delta_m.std == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in per_seed) / 2))
    # seed 0 of ew by hand: (2/96 + 4/94 + 0.02/0.2 + 0.05/0.25) / 4 × 100
    assert per_seed[0] == pytest.approx((2 / 96 + 4 / 94 + 0.1 + 0.2) / 4 * 100)
    # average ranks over the four metrics, ties shared (right/acc: ew = nash; right/ce: igbv1 = nash)
    assert ew.rank == pytest.approx((3 + 2.5 + 3 + 3) / 4)
    assert rows["igbv1"].rank == pytest.approx((2 + 1 + 2 + 1.5) / 4)
    assert rows["igbv1+nashmtl"].rank == pytest.approx((1 + 2.5 + 1 + 1.5) / 4)
    assert rows[STL].rank is None
    assert ew.time_per_epoch_s == pytest.approx(10.0 * (1.00 + 1.02 + 1.04) / 3)


def test_table_marks_the_best_per_column_with_mixed_directions(run_dir: Path) -> None:
    run = load_run(run_dir)
    grid = cells(table(run, table_rows(run)))
    assert list(grid) == [STL, "ew", "igbv1", "igbv1+nashmtl"]
    assert list(grid["ew"]) == [
        "left/acc ↑",
        "right/acc ↑",
        "left/ce ↓",
        "right/ce ↓",
        "Δm% ↓",
        "mean rank ↓",
        "time/epoch (s) ↓",
    ]

    def bold(column: str) -> set[str]:
        return {label for label, row in grid.items() if row[column].startswith("**")}

    assert bold("left/acc ↑") == {"igbv1+nashmtl"}
    assert bold("right/acc ↑") == {"igbv1"}
    # lower is better; STL's 0.2000 ties the best but STL is never marked
    assert bold("left/ce ↓") == {"igbv1+nashmtl"}
    assert bold("right/ce ↓") == {"igbv1", "igbv1+nashmtl"}  # a tie: both marked
    assert bold("Δm% ↓") == {"igbv1+nashmtl"}
    assert bold("mean rank ↓") == {"igbv1+nashmtl"}
    assert bold("time/epoch (s) ↓") == {"ew"}
    assert grid["ew"]["left/acc ↑"] == "95.00 ± 1.00"
    assert grid["ew"]["left/ce ↓"] == "0.2400 ± 0.0200"
    assert grid["igbv1+nashmtl"]["left/acc ↑"] == "**96.50 ± 0.50**"
    assert grid[STL]["Δm% ↓"] == "0.00"
    assert grid[STL]["mean rank ↓"] == "—"


def test_report_header_says_reduced_and_the_selection_rule(run_dir: Path, tmp_path: Path) -> None:
    path = write_report(run_dir, tmp_path / "out", plots=False)
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text()
    assert "REDUCED" in text
    assert "best validation epoch" in text
    assert "Seeds: 0, 1, 2" in text
    assert "![" not in text  # plots=False embeds nothing


def test_full_protocol_is_not_called_reduced(tmp_path: Path) -> None:
    run_dir = make_run_folder(tmp_path / "run", reduced=False)
    assert "REDUCED" not in write_report(run_dir, plots=False).read_text()


def test_missing_stl_gives_na_and_a_note(tmp_path: Path) -> None:
    run_dir = make_run_folder(tmp_path / "run", stl=False)
    text = write_report(run_dir, plots=False).read_text()
    grid = cells(text)
    assert list(grid) == ["ew", "igbv1", "igbv1+nashmtl"]
    assert {row["Δm% ↓"] for row in grid.values()} == {"n/a"}
    assert "no finished single-task (STL) baseline" in text
    assert grid["igbv1"]["mean rank ↓"] == "1.62"  # ranks do not need STL


def test_one_task_without_stl_is_named(tmp_path: Path) -> None:
    run_dir = make_run_folder(tmp_path / "run")
    for seed_dir in (run_dir / "stl" / "right").iterdir():
        (seed_dir / "final.json").unlink()
    text = write_report(run_dir, plots=False).read_text()
    assert {row["Δm% ↓"] for row in cells(text).values()} == {"n/a"}
    assert "`right`" in text


def test_a_zero_stl_value_gives_na_not_a_crash(tmp_path: Path) -> None:
    run_dir = make_run_folder(tmp_path / "run")
    for seed_dir in (run_dir / "stl" / "right").iterdir():
        final = json.loads((seed_dir / "final.json").read_text())
        final["test"]["right/ce"] = 0.0
        (seed_dir / "final.json").write_text(json.dumps(final))
    text = write_report(run_dir, plots=False).read_text()
    assert {row["Δm% ↓"] for row in cells(text).values()} == {"n/a"}
    assert "`right/ce` is 0" in text


def test_stl_weights_with_every_task_column_are_accepted(tmp_path: Path) -> None:
    # the runner writes every task's column in an STL run's weights.csv; the report does not read them
    run_dir = make_run_folder(tmp_path / "run")
    (run_dir / "stl" / "left" / "seed0" / "weights.csv").write_text("step,epoch,left,right\n1,0,1.0,0.0\n")
    assert load_run(run_dir).stl["left"].finished[0].best_epoch == 5


def test_unfinished_seeds_are_flagged_and_left_out(tmp_path: Path) -> None:
    run_dir = make_run_folder(tmp_path / "run", unfinished={"igbv1": [2]})
    text = write_report(run_dir, plots=False).read_text()
    grid = cells(text)
    assert "igbv1 † (2/3 seeds)" in grid
    assert grid["igbv1 † (2/3 seeds)"]["left/acc ↑"].strip("*") == "95.50 ± 0.71"  # seeds 0 and 1: 95, 96
    assert "2/3 seeds finished (seeds 0, 1)" in text
    rows = {r.label: r for r in table_rows(load_run(run_dir))}
    assert rows["igbv1"].delta_m_per_seed == pytest.approx(
        [hand_delta_m(95, 92, 0.20, 0.26), hand_delta_m(96, 93, 0.21, 0.28)]
    )


def test_a_method_with_no_finished_seed_keeps_its_row(tmp_path: Path) -> None:
    run_dir = make_run_folder(tmp_path / "run", unfinished={"ew": [0, 1, 2]})
    grid = cells(write_report(run_dir, plots=False).read_text())
    row = grid["ew † (0/3 seeds)"]
    assert row["left/acc ↑"] == "—"
    assert row["Δm% ↓"] == "—"
    assert row["mean rank ↓"] == "—"


def test_a_single_seed_has_no_std(tmp_path: Path) -> None:
    run_dir = make_run_folder(tmp_path / "run", seeds=(0,))
    text = write_report(run_dir, plots=False).read_text()
    grid = cells(text)
    assert grid["ew"]["left/acc ↑"] == "94.00 ± —"
    # STL is its seed 0 alone here: 95, 93, 0.19, 0.24
    expected = ((95 - 94) / 95 + (93 - 90) / 93 + (0.22 - 0.19) / 0.19 + (0.30 - 0.24) / 0.24) / 4 * 100
    assert grid["ew"]["Δm% ↓"] == f"{expected:.2f} ± —"
    assert "std shows as —" in text


def test_truncated_history_line_is_dropped_and_corrupt_files_are_named(tmp_path: Path) -> None:
    run_dir = make_run_folder(tmp_path / "run")
    history = run_dir / "runs" / "igbv1" / "seed0" / "metrics.jsonl"
    history.write_text(history.read_text() + '{"epoch": 5, "tra')  # killed mid-write
    assert len(load_run(run_dir).methods[1].history[0]) == 5
    final = run_dir / "runs" / "igbv1__nashmtl" / "seed1" / "final.json"
    final.write_text("{not json")
    with pytest.raises(ValueError, match=r"igbv1__nashmtl/seed1/final\.json"):
        load_run(run_dir)


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        write_report(tmp_path)


def test_without_matplotlib_the_table_is_written_with_the_install_hint(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "taskbalance.benchmarks.report.plots", None)  # import now fails
    text = write_report(run_dir, tmp_path).read_text()
    assert "pip install 'taskbalance[bench]'" in text
    assert len(cells(text)) == 4
    assert not list(tmp_path.glob("*.png"))


PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_and_embedded(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    path = write_report(run_dir)
    assert path == run_dir / "report" / "report.md"
    text = path.read_text()
    for name in ("curves.png", "weights.png", "delta_m.png", "cost.png"):
        png = path.parent / name
        assert png.read_bytes()[:8] == PNG, name
        assert f"]({name})" in text
    assert "moving average" in text  # the weights caption says they are smoothed
    assert not list(path.parent.glob("*.tmp"))


def test_plots_skip_what_the_data_cannot_show(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # EW alone: its weights never change (no weights plot); no STL: no Δm plots
    run_dir = make_run_folder(tmp_path / "run", methods=("ew",), stl=False)
    text = write_report(run_dir).read_text()
    assert sorted(p.name for p in (run_dir / "report").glob("*.png")) == ["curves.png"]
    assert "](weights.png)" not in text
    assert "](delta_m.png)" not in text


def test_weights_are_placed_in_fractional_epochs_and_averaged_over_seeds(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    from taskbalance.benchmarks.report import plots  # an import error of our own module fails, never skips

    run = load_run(run_dir)
    igb = run.methods[1]
    x, weights = plots._mean_weights(igb)
    assert x[0] == 0.0
    assert x[-1] == pytest.approx(4 + 38 / 40)  # the last sample: step 199 of 1..200 (40 steps per epoch)
    first = [trace.weights[-1][1] for trace in igb.weights.values()]
    assert weights[-1, 1] == pytest.approx(sum(first) / 3)
    assert weights[:40] == pytest.approx(
        1.0
    )  # 40 samples, every 2nd step: IGBv1 weighs equally until its baseline exists (epochs 0-1)
    proxy = plots._gap_proxy(igb, run.tasks)
    assert proxy is not None
    assert proxy[1][0] == pytest.approx([1.0, 1.0])  # epoch 1 over itself
    assert bool((proxy[1][-1] < 1).all())


def test_module_reloads_without_side_effects() -> None:
    # the report must not change matplotlib's global backend (it uses Figure + Agg directly)
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    importlib.reload(importlib.import_module("taskbalance.benchmarks.report.plots"))
    assert matplotlib.get_backend() == before


def test_results_json_is_not_trusted(run_dir: Path, tmp_path: Path) -> None:
    copy = make_run_folder(tmp_path / "run")
    (copy / "results.json").write_text(json.dumps([{"method": "ew", "seed": 0, "metric": "left/acc", "value": 0}]))
    assert cells(write_report(copy, plots=False).read_text())["ew"]["left/acc ↑"] == "95.00 ± 1.00"
