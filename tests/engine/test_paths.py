"""The rule ("heuristic", and the incumbent of "auto"): features-first when exact, vmap off the CPU, the Gramian path
when J would not fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
import torch
from torch import Tensor

from taskbalance.engine import Engine
from taskbalance.engine.paths import available_memory, candidates, resolve_rule
from tests.engine.helpers import make_method


def test_rule() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_rule(True, cpu) == "features_loop"
    assert resolve_rule(True, cuda) == "features"
    assert resolve_rule(False, cpu) == "loop"
    assert resolve_rule(False, cuda) == "batched"
    # a G-only method whose J would not fit takes the Gramian path; J-reading methods and small J do not
    huge = 10 * (available_memory(cpu) or 2**40)
    assert resolve_rule(True, cpu, huge, reads_gramian=True) == "gramian"
    assert resolve_rule(True, cpu, huge, reads_gramian=False) == "features_loop"
    assert resolve_rule(True, cpu, 2**20, reads_gramian=True) == "features_loop"


def test_candidates_of_auto() -> None:
    assert candidates(True, False, False) == ["features_loop", "features", "loop", "batched"]
    assert candidates(False, True, False) == ["loop", "batched", "gramian"]
    # once vmap failed on the model, no path through it is timed (the Gramian path falls back by itself)
    assert candidates(True, True, True) == ["features_loop", "loop", "gramian"]


@pytest.mark.parametrize("path", ["auto", "heuristic"])
def test_the_rule_takes_the_gramian_path_when_j_would_not_fit(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without timing anything: the J paths would not fit."""
    from taskbalance.engine import engine as engine_module
    from taskbalance.engine import paths

    monkeypatch.setattr(paths, "available_memory", lambda device: 1000)  # bytes: J of TinyMTL is larger
    monkeypatch.setattr(engine_module, "resolve_rule", _resolve_without_floor(paths.resolve_rule))
    from tests.models import TinyMTL, make_data, task_losses

    model, (x, y) = TinyMTL(), make_data()
    results = {}
    for name in (path, "features"):
        model.zero_grad(set_to_none=True)
        z, losses = task_losses(model, x, y)
        engine = Engine(name)  # type: ignore[arg-type]
        method = make_method("weights", 3, torch.float32)
        method.setup(3)
        engine(losses, list(model.encoder.parameters()), list(model.heads.parameters()), method, z)
        results[engine.last_path] = [cast(Tensor, p.grad).clone() for p in model.parameters()]
    assert set(results) == {"gramian", "features"}
    assert not engine.tuner.trials
    for a, b in zip(results["gramian"], results["features"], strict=True):
        torch.testing.assert_close(a, b)


def _resolve_without_floor(resolve: Callable[..., str]) -> Callable[..., str]:
    """resolve_rule with the 256 MB floor lifted, so that a tiny model's J counts as too large."""

    def lifted(exact: bool, device: torch.device, jacobian_bytes: int = 0, reads_gramian: bool = False) -> str:
        return resolve(exact, device, jacobian_bytes * 2**30, reads_gramian)

    return lifted
