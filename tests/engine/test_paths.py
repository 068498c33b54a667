"""What "auto" resolves to: features-first when exact, vmap off the CPU, the Gramian path when J would not fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
import torch
from torch import Tensor

from taskbalance.engine import Engine
from taskbalance.engine.paths import available_memory, resolve_auto
from tests.engine.helpers import make_method


def test_auto_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_auto(True, cpu) == ("features", False)
    assert resolve_auto(True, cuda) == ("features", True)
    assert resolve_auto(False, cpu) == ("loop", False)
    assert resolve_auto(False, cuda) == ("batched", True)
    # a G-only method whose J would not fit takes the Gramian path; J-reading methods and small J do not
    huge = 10 * (available_memory(cpu) or 2**40)
    assert resolve_auto(True, cpu, huge, reads_gramian=True) == ("gramian", False)
    assert resolve_auto(True, cpu, huge, reads_gramian=False) == ("features", False)
    assert resolve_auto(True, cpu, 2**20, reads_gramian=True) == ("features", False)


def test_auto_takes_the_gramian_path_when_j_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskbalance.engine import engine as engine_module
    from taskbalance.engine import paths

    monkeypatch.setattr(paths, "available_memory", lambda device: 1000)  # bytes: J of TinyMTL is larger
    monkeypatch.setattr(engine_module, "resolve_auto", _resolve_without_floor(paths.resolve_auto))
    from tests.models import TinyMTL, make_data, task_losses

    model, (x, y) = TinyMTL(), make_data()
    results = {}
    for path in ("auto", "features"):
        model.zero_grad(set_to_none=True)
        z, losses = task_losses(model, x, y)
        engine = Engine(path)  # type: ignore[arg-type]
        method = make_method("weights", 3, torch.float32)
        method.setup(3)
        engine(losses, list(model.encoder.parameters()), list(model.heads.parameters()), method, z)
        results[engine.last_path] = [cast(Tensor, p.grad).clone() for p in model.parameters()]
    assert set(results) == {"gramian", "features"}
    for a, b in zip(results["gramian"], results["features"], strict=True):
        torch.testing.assert_close(a, b)


def _resolve_without_floor(resolve: Callable[..., tuple[str, bool]]) -> Callable[..., tuple[str, bool]]:
    """resolve_auto with the 256 MB floor lifted, so that a tiny model's J counts as too large."""

    def lifted(
        exact: bool, device: torch.device, jacobian_bytes: int = 0, reads_gramian: bool = False
    ) -> tuple[str, bool]:
        return resolve(exact, device, jacobian_bytes * 2**30, reads_gramian)

    return lifted
