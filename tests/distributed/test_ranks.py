"""Balancing on a process group: 2 CPU processes (gloo) spawned by the test, 20 steps of SGD each (issue 10).

Exact mode: both ranks end with the same parameters and balancer state (max abs difference 0.0), equal to one
process on the whole batch (≤ 1e-5 relative). Local mode: the same parameters on both ranks.
"""

from __future__ import annotations

import functools
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import taskbalance as tb
from tests.distributed import workers
from tests.distributed.workers import SPECS, Run

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _on_two_ranks(runs: tuple[Run, ...], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    job = functools.partial(workers.train_runs, runs=runs)
    mp.spawn(workers.run_ranks, args=(2, _free_port(), str(tmp_path), job), nprocs=2)
    load = functools.partial(torch.load, weights_only=False)
    return load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")


def _single(spec: str, **options: Any) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return workers.train(spec, rank=0, world=1, **options)


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> None:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and keys == [k for k in b if k.startswith(prefix)]
    differ = [k for k in keys if not torch.equal(a[k], b[k])]
    assert not differ, f"ranks differ in {differ}"


def _assert_close(ranked: dict[str, torch.Tensor], single: dict[str, torch.Tensor]) -> None:
    assert ranked.keys() == single.keys()
    for key, value in single.items():
        if value.dtype == torch.uint8:  # a generator's state: the same stream
            assert torch.equal(ranked[key], value), key
            continue
        scale = value.double().abs().max().clamp(min=1e-6) if value.numel() else 1.0
        difference = (ranked[key].double() - value.double()).abs().max() if value.numel() else 0.0
        assert difference <= 1e-5 * scale, f"{key}: {float(difference):.3g} (scale {float(scale):.3g})"


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    runs: tuple[Run, ...] = tuple((spec, spec, {}) for spec in SPECS)
    runs += (
        ("ddp:nashmtl", "nashmtl", {"wrap_ddp": True}),
        ("ddp:igbv1", "igbv1", {"wrap_ddp": True}),
        ("accumulated:igbv1+nashmtl", "igbv1+nashmtl", {"micro_batches": 2}),
        ("reused:nashmtl", "nashmtl", {"update_weights_every": 3}),
        ("scaled:igbv1+upgrad", "igbv1+upgrad", {"scaled": True}),
        ("local:nashmtl", "nashmtl", {"distributed": "local"}),
        ("local:igbv1+pcgrad", "igbv1+pcgrad", {"distributed": "local"}),
    )
    return _on_two_ranks(runs, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("spec", SPECS)
def test_exact_ranks_stay_identical_and_equal_one_process_on_the_whole_batch(
    spec: str, exact_runs: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    rank0, rank1 = (run[spec] for run in exact_runs)
    _assert_identical(rank0, rank1)
    _assert_close(rank0, _single(spec))


@pytest.mark.parametrize(
    "label", ["ddp:nashmtl", "ddp:igbv1", "accumulated:igbv1+nashmtl", "reused:nashmtl", "scaled:igbv1+upgrad"]
)
def test_ddp_wrapping_accumulation_reused_weights_and_a_grad_scaler_give_the_one_process_run(
    label: str, exact_runs: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    rank0, rank1 = (run[label] for run in exact_runs)
    _assert_identical(rank0, rank1)
    options = {
        "reused:nashmtl": {"update_weights_every": 3},
        "scaled:igbv1+upgrad": {"scaled": True},  # one process: the whole batch overflows at step 9
    }.get(label, {})
    _assert_close(rank0, _single(label.split(":")[1], **options))
    if label.startswith("scaled"):
        assert rank0["scale"] == rank1["scale"] and float(rank0["scale"]) < 2.0**8 * 2**5  # backed off once


@pytest.mark.parametrize("label", ["local:nashmtl", "local:igbv1+pcgrad"])
def test_local_ranks_keep_identical_parameters_and_loss_method_state(
    label: str, exact_runs: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    rank0, rank1 = (run[label] for run in exact_runs)
    _assert_identical(rank0, rank1, prefix="model.")
    _assert_identical(rank0, rank1, prefix="balancer.loss.")
    # an approximation: not the whole batch's solution
    single = _single(label.split(":")[1])
    assert any(not torch.allclose(rank0[k], single[k], rtol=1e-4) for k in single if k.startswith("model."))


def test_the_balancer_off_a_process_group_is_the_plain_one() -> None:
    balancer = tb.make("nashmtl", n_tasks=3, distributed="exact")
    assert tb.engine.distributed.Ranks.of("exact") is None
    assert "distributed" not in repr(balancer)
    with pytest.raises(ValueError, match="distributed must be one of"):
        tb.make("ew", n_tasks=2, distributed="global")


def test_ranks_that_disagree_are_all_refused_with_one_clear_error(tmp_path: Path) -> None:
    mp.spawn(workers.run_ranks, args=(2, _free_port(), str(tmp_path), workers.refusals), nprocs=2)
    told = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in told:
        assert "ranks [1] balance other parameters than rank 0" in rank["shared"]
        assert "ranks [1] hold another balancer than rank 0" in rank["options"]
        assert "base_epoch=2" in rank["options"]
        assert "non-finite loss (NaN or Inf) for task(s) [1] on rank(s) [1]" in rank["nan"]
