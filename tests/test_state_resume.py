"""Every method, both levels: a run saved mid-way and resumed in fresh objects ends bit-identical; reset() = fresh."""

from __future__ import annotations

import functools
import io
from typing import Any

import pytest
import torch

import taskbalance as tb
from tests.models import TinyMTL, make_data, task_losses

# spec -> options; each runs through epochs with end_epoch and after_step, as a training loop would
METHODS: dict[str, dict[str, Any]] = {
    "si": {},
    "uw": {},
    "uw_si": {},
    "dwa": {},
    "dwa_si": {},
    "rlw": {"seed": 0},
    "rlw_si": {"seed": 1},
    "gls": {},
    "imtl_l": {},
    "famo": {"min_losses": [0.0, 0.01, 0.0]},
    "stch": {"warmup_epochs": 2},
    "igbv1": {},
    # gradient level (and compositions): warm starts, EMAs, generators, step counters
    **{f"ew+{name}": {} for name in ("mgda", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "fairgrad", "config")},
    "ew+pcgrad": {"seed": 0},
    "ew+gradvac": {"seed": 0},
    "ew+graddrop": {"seed": 0},
    "ew+moco": {},
    "ew+gradnorm": {},
    "ew+nashmtl": {"update_weights_every": 2},
    "dbmtl": {},
    "imgrad": {},
    "igbv1+nashmtl": {},
    "igbv1+upgrad": {"update_weights_every": 3},
    "famo+dbmtl": {},
    "rlw+pcgrad": {"loss_options": {"seed": 1}, "gradient_options": {"seed": 2}},
}
EPOCHS, BATCHES, BATCH = 5, 3, 16
X, Y = make_data(n=BATCHES * BATCH)


def _fresh(spec: str, options: dict[str, Any]) -> tuple[TinyMTL, tb.Balancer, torch.optim.Optimizer]:
    model = TinyMTL()
    # the rule's path: a resume within "auto"'s trial times the paths again (tests/engine/test_tuning.py)
    balancer = tb.make(spec, n_tasks=3, engine="heuristic", **options)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=0.01)
    return model, balancer, optimizer


def _train(model: TinyMTL, balancer: tb.Balancer, optimizer: torch.optim.Optimizer, start: int, stop: int) -> None:
    """Global steps [start, stop): backward, step, after_step with the updated model, end_epoch per epoch."""
    for step in range(start, stop):
        batch = step % BATCHES
        x, y = X[batch * BATCH : (batch + 1) * BATCH], Y[batch * BATCH : (batch + 1) * BATCH]
        _, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters())
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            _, after = task_losses(model, x, y)
        balancer.after_step(after)
        if batch == BATCHES - 1:
            balancer.end_epoch()


def _unseeded(options: dict[str, Any]) -> dict[str, Any]:
    return {k: _unseeded(v) if isinstance(v, dict) else v for k, v in options.items() if k != "seed"}


def _roundtrip(objects: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(objects, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested state (tensors bit for bit, same dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@functools.cache
def _uninterrupted(spec: str) -> dict[str, Any]:
    model, balancer, optimizer = _fresh(spec, METHODS[spec])
    _train(model, balancer, optimizer, 0, EPOCHS * BATCHES)
    return {"model": model.state_dict(), "balancer": balancer.state_dict()}


@pytest.mark.parametrize("spec", list(METHODS))
@pytest.mark.parametrize("stop_at", [BATCHES + 1, 3 * BATCHES + 2], ids=["epoch1", "epoch3"])
def test_interrupted_run_resumes_bit_identically(spec: str, stop_at: int) -> None:
    options = METHODS[spec]
    model, balancer, optimizer = _fresh(spec, options)
    _train(model, balancer, optimizer, 0, stop_at)
    saved = _roundtrip(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "balancer": balancer.state_dict()}
    )
    # fresh objects, differently seeded: generators must come back from the state
    model, balancer, optimizer = _fresh(spec, _unseeded(options))
    model.load_state_dict(saved["model"])
    balancer.load_state_dict(saved["balancer"])
    optimizer.load_state_dict(saved["optimizer"])
    _train(model, balancer, optimizer, stop_at, EPOCHS * BATCHES)

    expected = _uninterrupted(spec)
    assert _same(model.state_dict(), expected["model"])
    assert _same(balancer.state_dict(), expected["balancer"])
    assert not _same(model.state_dict(), TinyMTL().state_dict())


@pytest.mark.parametrize("spec", list(METHODS))
def test_reset_restores_the_fresh_state(spec: str) -> None:
    model, balancer, optimizer = _fresh(spec, METHODS[spec])
    fresh = _roundtrip({"state": balancer.state_dict()})["state"]
    _train(model, balancer, optimizer, 0, EPOCHS * BATCHES)
    balancer.reset()
    assert _same(balancer.state_dict(), fresh)
