"""``taskbalance bench solvers``: its synthetic Gramians, which methods it times, its table and target, its CLI."""

from __future__ import annotations

import pytest
import torch

import taskbalance as tb
from taskbalance.cli import main
from taskbalance.gradient_balancing.mgda import MGDA
from taskbalance.speed import solvers
from tests.test_cli_mistakes import one_line_failure


def test_gramians_are_symmetric_psd_reproducible_and_drift() -> None:
    first = solvers.gramian_sequence(4, 3, seed=5)
    again = solvers.gramian_sequence(4, 3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for g in first:
        assert g.shape == (4, 4) and g.dtype == torch.float32
        assert torch.allclose(g, g.T, rtol=1e-6)
        assert torch.linalg.eigvalsh(g.double()).min() > 0  # K ≪ P random rows: full rank
    assert not torch.equal(first[0], first[1])  # the gradients drift: a warm start is not the answer
    # a shared direction: every pair of gradients at a positive cosine, as tasks that mostly agree
    g = first[0].double()
    cosines = g / torch.outer(g.diagonal().sqrt(), g.diagonal().sqrt())
    assert cosines.min() > 0


def test_the_timed_methods_are_exactly_those_that_read_g() -> None:
    names = solvers.gramian_methods()
    expected = [n for n in tb.available() if tb.make(n, n_tasks=2).gradient.needs == "gramian"]
    assert names == expected
    assert {"mgda", "imgrad", "nashmtl", "upgrad"} <= set(names)
    assert not {"dbmtl", "moco", "graddrop", "ew", "igbv2"} & set(names)  # J readers, loss methods


@pytest.mark.parametrize(
    ("specs", "message"),
    [([], "no methods"), (["nope"], "not nope"), (["dbmtl"], "not dbmtl"), (["mgda", "ew"], "not ew")],
)
def test_methods_that_do_not_solve_from_g_are_refused(specs: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        solvers.check_methods(specs)


def test_the_table_bolds_each_miss_and_names_it() -> None:
    times = {"fast": {3: 0.5, 10: 0.99, 11: 9.0}, "slow": {3: 1.2, 10: 0.8, 11: 10.5}}
    table = solvers.solver_table(times, [3, 10, 11])
    assert "| fast | 0.500 | 0.990 | 9.000 |" in table
    assert "| slow | **1.200** | 0.800 | **10.500** |" in table  # 1 ms up to K = 10, 10 ms above
    assert table.endswith("misses: slow at K = 3: 1.20 ms; slow at K = 11: 10.50 ms.")
    assert solvers.solver_table({"fast": {3: 0.5}}, [3]).endswith("holds.")


def test_a_solve_is_timed_as_the_engine_calls_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timed call goes through the method's forward (inference mode, weights cloned out), after the
    warm-up calls, and the median of the timed ones is returned."""
    calls: list[bool] = []
    clock = iter(range(1000))
    monkeypatch.setattr(solvers, "timed_call", lambda fn, device: (fn(), float(next(clock))))
    forward = MGDA.forward

    def spy(self: MGDA, matrix: torch.Tensor, losses: torch.Tensor) -> object:
        calls.append(torch.is_inference_mode_enabled())
        return forward(self, matrix, losses)

    monkeypatch.setattr(MGDA, "forward", spy)
    median = solvers.solve_ms("mgda", 3, repeats=5)
    assert calls == [False] * (solvers.WARMUP + 5)  # forward itself enters inference mode, as in the engine
    assert median == solvers.WARMUP + 2  # the timed calls got 10..14 "ms"


def test_run_restores_the_thread_count_and_says_what_it_measured() -> None:
    before = torch.get_num_threads()
    text = solvers.run([2, 3], ["pcgrad"], repeats=2, threads=1)
    assert torch.get_num_threads() == before
    assert "1 thread(s), process CPU time" in text
    assert "| method | K = 2 | K = 3 |" in text and "| pcgrad |" in text


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "solvers", "--methods", "mgda", "--tasks", "2", "--repeats", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| mgda |" in out and "Target" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "dbmtl"], "solve from G"),
        (["--tasks", "0"], "positive integer"),
        (["--repeats", "x"], "positive integer"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert message in one_line_failure(["bench", "solvers", *argv], capsys)
