"""BalanceResult.as_dict: plain floats for any logger, named by task."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

import taskbalance as tb


def _result(spec: str) -> tb.BalanceResult:
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 4)
    heads = [torch.nn.Linear(4, 1) for _ in range(2)]
    z = shared(torch.randn(8, 3))
    losses = torch.stack([head(z).pow(2).mean() + 0.1 for head in heads])
    return tb.make(spec, n_tasks=2).backward(losses, shared_params=shared.parameters(), features=z)


def test_values_are_the_results_tensors_as_floats() -> None:
    result = _result("igbv1+mgda")
    logged = result.as_dict(task_names=["left", "right"], prefix="train/")
    assert json.loads(json.dumps(logged)) == logged  # plain Python floats
    assert all(type(v) is float for v in logged.values())
    for column, tensor in [
        ("weight", result.weights),
        ("loss", result.losses),
        ("balanced_loss", result.balanced_losses),
        ("loss_weight", result.loss_weights),
        ("gradient_weight", result.gradient_weights),
    ]:
        assert tensor is not None
        assert [logged[f"train/{column}/left"], logged[f"train/{column}/right"]] == tensor.double().tolist()
    assert logged["train/overhead_s"] == result.overhead_s
    assert logged["train/converged"] == 1.0
    assert logged["train/skipped"] == 0.0
    assert len(logged) == 5 * 2 + 3


def test_methods_without_gradient_weights_log_none_and_default_names() -> None:
    logged = _result("dbmtl").as_dict()
    assert "weight/task0" in logged and "weight/task1" in logged
    assert not any(key.startswith("gradient_weight/") for key in logged)


def test_a_csv_row_and_its_header() -> None:
    rows = io.StringIO()
    logged = _result("ew").as_dict(task_names=["a", "b"])
    writer = csv.DictWriter(rows, fieldnames=list(logged))
    writer.writeheader()
    writer.writerow(logged)
    header, row = rows.getvalue().splitlines()
    assert header.split(",")[0] == "weight/a" and float(row.split(",")[0]) == 1.0


@pytest.mark.parametrize("names", [["a"], ["a", "a"], ["a", 2], ["a", "b", "c"]])
def test_task_names_must_be_k_distinct_strings(names: list[object]) -> None:
    with pytest.raises(ValueError, match="task_names must be 2 distinct strings"):
        _result("ew").as_dict(task_names=names)  # type: ignore[arg-type]
