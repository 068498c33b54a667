"""The speed benchmark's machinery: memory accounting, round-robin timing, targets, and one tiny end-to-end case."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import taskbalance as tb
from taskbalance import speed
from taskbalance.cli import main
from taskbalance.speed import cases, report, run_case, steps, torchjd_steps
from taskbalance.speed.report import Row, targets
from taskbalance.speed.timing import PeakMemory, measure
from tests.models import TinyMTL, make_data


def test_peak_memory_counts_live_storages_exactly() -> None:
    with PeakMemory() as tracker:
        a = torch.zeros(1000, 250)  # 1e6 bytes
        b = torch.zeros(500, 250)  # 5e5 bytes: 1.5e6 live
        del a
        c = torch.zeros(250, 250)  # a freed: 7.5e5 live
        view = c[:10]  # a view allocates nothing
        del b, c, view
    assert tracker.peak == 1_500_000


def test_measure_is_round_robin() -> None:
    calls: list[str] = []
    names = "abcdef"
    steps = {name: (lambda name=name: calls.append(name)) for name in names}
    times = measure(steps, repeats=4, device=torch.device("cpu"), warmup=1)  # type: ignore[arg-type]
    rounds = [calls[i : i + len(names)] for i in range(0, len(calls), len(names))]
    assert len(rounds) == 5 and all(sorted(r) == list(names) for r in rounds)  # each step once per round
    assert len({"".join(r) for r in rounds[1:]}) > 1  # in a shuffled order
    assert [len(t) for t in times.values()] == [4] * len(names)


def test_cheap_steps_are_repeated_within_a_timed_call() -> None:
    counts = {"cheap": 0, "costly": 0}

    def cheap() -> None:
        counts["cheap"] += 1

    def costly() -> None:
        counts["costly"] += 1
        sum(range(200_000))  # a few ms of CPU time

    times = measure(
        {"cheap": cheap, "costly": costly}, repeats=2, device=torch.device("cpu"), warmup=1, min_call_ms=1e3
    )
    assert counts["cheap"] == 1 + 2 * 50  # capped at 50 per call
    assert 1 + 2 < counts["costly"] <= 1 + 2 * 50
    assert [len(t) for t in times.values()] == [2, 2]  # one time per step and round, however many calls it took


def _row(name: str, kind: str, k: int = 2, reads_gramian: bool = True, **ratios: float) -> Row:
    values = {"vs_ew": 1.0, "vs_floor": 1.0, "vs_torchjd": math.nan, "solve_ms": math.nan, **ratios}
    return Row("m", k, name, kind, 1.0, peak_mb=0.0, reads_gramian=reads_gramian, **values)


def test_targets_name_what_misses() -> None:
    rows = [
        _row("ew", "ew", vs_torchjd=0.5),
        _row("uw", "loss", vs_ew=1.04),
        _row("dwa", "loss", vs_ew=1.07),
        _row("mgda", "gradient", vs_floor=1.2, vs_torchjd=0.8, solve_ms=0.5),
        _row("upgrad", "gradient", vs_floor=1.05, vs_torchjd=0.95, solve_ms=2.0),
        _row("nashmtl", "gradient", k=40, solve_ms=9.0),
        _row("graddrop", "gradient", reads_gramian=False, solve_ms=3.0),  # O(K·P) on J: no solver target
        _row("mgda (N = 10)", "amortised", k=40, vs_ew=2.0),  # K > 11: not checked
    ]
    found = {t.label.split(" ")[0]: t for t in targets(rows)}
    assert found["loss"].misses == ["m: dwa 1.07"]
    assert found["exact"].misses == ["m: mgda 1.20"]
    assert found["≤"].misses == ["m: upgrad 0.95"] and found["≤"].checked == 3
    assert found["solver"].misses == ["m: upgrad 2.00 ms"]
    assert found["amortised"].checked == 0 and not found["amortised"].holds


def _tiny(device: torch.device, gen: torch.Generator) -> cases.SpeedCase:
    model = TinyMTL(n_tasks=3).to(device)
    x, y = make_data(n_tasks=3)

    def losses(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features, outputs = m(x)
        return features, [F.mse_loss(out, y[:, k]) for k, out in enumerate(outputs)]

    return cases.SpeedCase("tiny", "TinyMTL", 3, model, losses)


def test_run_case_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cases.BUILDERS, "tiny", _tiny)
    # IGBv2 is timed over its SAC period: a short one (and small minibatches) keeps the test fast
    monkeypatch.setattr(steps, "IGBV2_OPTIONS", {**steps.IGBV2_OPTIONS, "update_every": 3, "batch_size": 8})
    with_jd = torchjd_steps.available()
    _, rows = run_case("tiny", torch.device("cpu"), 1, with_jd, {"upgrad", "igbv2", "mgda_ub", "dbmtl"})
    by_name = {r.name: r for r in rows}
    # every ratio divides by the right row: EW's step, and the fastest of the floor's candidates
    floors = {r.name: r.ms for r in rows if r.kind == "floor"}
    assert {"raw loop", "raw batched"} <= set(floors)
    assert all(r.vs_ew == r.ms / by_name["ew"].ms and r.vs_floor == r.ms / min(floors.values()) for r in rows)
    assert by_name["igbv2"].kind == "loss" and math.isnan(by_name["igbv2"].peak_mb)  # timed over 3 steps
    assert by_name["mgda_ub"].kind == "representation"
    assert by_name["upgrad (N = 10)"].kind == "amortised" and "dbmtl (N = 10)" not in by_name  # no weights
    assert by_name["upgrad"].solve_ms > 0 and by_name["upgrad"].peak_mb > 0 and by_name["upgrad"].reads_gramian
    assert not by_name["dbmtl"].reads_gramian
    if with_jd:
        assert by_name["torchjd upgrad"].kind == "torchjd"
        assert by_name["upgrad"].vs_torchjd == by_name["upgrad"].ms / by_name["torchjd upgrad"].ms


def test_auto_is_tried_once_per_case_and_every_balancer_starts_from_its_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(cases.BUILDERS, "tiny", _tiny)
    case = cases.build("tiny", torch.device("cpu"))
    auto = steps.auto_trial(case, torch.device("cpu"))
    assert sorted(key[-3:] for key in auto.chosen) == ["G=0", "G=1"]  # methods reading J, and reading G
    tried: list[str] = []
    original = steps.Balancer.backward

    def spy(self: steps.Balancer, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        tried.extend(self.path_tuner.trials)  # a trial in progress would show here
        return result

    monkeypatch.setattr(steps.Balancer, "backward", spy)
    timed = steps.entries(case, torch.device("cpu"), False, {"mgda", "dbmtl"}, auto)
    for entry in timed:
        entry.step()
    assert not tried
    assert "engine auto (w = 1)" in {e.name for e in timed}
    note = report.auto_note(auto)
    assert note.count("`auto` for methods reading") == 2 and all(p in note for p in auto.chosen.values())


def test_several_thread_counts_add_a_speed_up_column(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cases.BUILDERS, "tiny", _tiny)
    monkeypatch.setitem(speed.__dict__, "CASE_NAMES", (*speed.CASE_NAMES, "tiny"))
    monkeypatch.setattr(speed, "check_cases", lambda names: list(names))
    before = torch.get_num_threads()
    text = speed.run(["tiny"], "cpu", 1, False, ["mgda"], progress=False, threads=[1, 2])
    assert torch.get_num_threads() == before  # restored
    one, two = text.split("# 2 thread(s)")
    assert one.startswith("# 1 thread(s)") and "speed-up vs" not in one
    header = next(line for line in two.splitlines() if line.startswith("| method"))
    assert header.endswith("speed-up vs 1 thread(s) |")
    row = next(line for line in two.splitlines() if line.startswith("| mgda |"))
    ms_two = float(row.split("|")[3])
    ms_one = float(next(line for line in one.splitlines() if line.startswith("| mgda |")).split("|")[3])
    assert float(row.split("|")[-2]) == pytest.approx(ms_one / ms_two, abs=0.01)


@pytest.mark.skipif(not torchjd_steps.available(), reason="torchjd not installed")
@pytest.mark.parametrize("spec", ["ew", "mgda", "upgrad"])
def test_torchjd_drives_the_same_aggregator(spec: str) -> None:
    # the comparison is fair only if both compute the same update: same shared gradient (Mean = EW / K)
    device = torch.device("cpu")
    case = _tiny(device, torch.Generator())
    ours, theirs = TinyMTL(n_tasks=3), TinyMTL(n_tasks=3)
    features, losses = case.losses(ours)
    # UPGrad with torchjd's trace normalisation and ridge (ours default to the exact projection)
    ours_spec = "upgrad[norm_eps=1e-4, reg_eps=1e-4]" if spec == "upgrad" else spec
    tb.make(ours_spec, n_tasks=3).backward(losses, ours.encoder.parameters(), features=features)
    features, losses = case.losses(theirs)
    aggregator = torchjd_steps.aggregators(3)[spec]()
    torchjd_steps.backward(losses, features, list(theirs.encoder.parameters()), aggregator)
    # ours follow the sum convention (K equal gradients give K·g), torchjd's the mean: a factor K = 3 on the
    # shared parameters; heads get ∇ℓ_k from both. torchjd's MGDA is Frank-Wolfe stopped at a step below 1e-3.
    rtol = 2e-2 if spec == "mgda" else 1e-4
    for module, factor in ((ours.encoder, theirs.encoder), 3.0), ((ours.heads, theirs.heads), 1.0):
        for a, b in zip(module[0].parameters(), module[1].parameters(), strict=True):
            assert a.grad is not None and b.grad is not None
            torch.testing.assert_close(a.grad, b.grad * factor, rtol=rtol, atol=rtol * float(a.grad.abs().max()))


def test_cli_refuses_unknown_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "speed", "--cases", "nope"]) == 2
    assert "unknown case" in capsys.readouterr().err
