"""The contracts every registered method keeps, each stated once and checked for every name in ``tb.available()``.

A method that legitimately departs from a contract is listed, with the reason, in the table of that contract;
tables name what a method gives instead where that is a rule of its own (e.g. Nash-MTL's √K·g/‖g‖ for equal
gradients). Method files (tests/loss_balancing, tests/gradient_balancing) keep only what is specific to one method.

Everything goes through the public API: ``tb.make``, the method's ``forward`` (``balancer.loss(L)``,
``balancer.gradient(G or J, ℓ̃)``), ``Balancer.backward`` / ``after_step`` / ``end_epoch``, ``state_dict`` /
``load_state_dict``, ``reset`` and ``repr``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import taskbalance as tb
from taskbalance.engine.grad import clip_update
from taskbalance.gradient_balancing.base import Combination, GradientBalancer
from taskbalance.loss_balancing.base import LossBalancer
from taskbalance.registry import GRADIENT_METHODS, GRADIENT_PRESETS, LOSS_METHODS, LOSS_PRESETS, split_options
from tests import reference
from tests.models import DEGENERATE_JACOBIANS, TinyMTL, make_data, task_losses

F32, F64 = torch.float32, torch.float64
#: a modest number of examples per contract and method (the file runs in well under a minute)
FEW = settings(max_examples=10)

LOSS_NAMES = sorted({*LOSS_METHODS, *LOSS_PRESETS})
GRADIENT_NAMES = sorted({*GRADIENT_METHODS, *GRADIENT_PRESETS})
#: gradient-method options whose behaviour a method-level contract checks too (the defaults are the names); the
#: presets mgda_ub / aligned_mtl_ub are their base method on another engine path: method-level contracts run the
#: base name, the Balancer-level ones (state, reset, dtype, repr) every name
MGDA_NORMALIZATIONS = ["mgda[normalization='l2']", "mgda[normalization='loss']", "mgda[normalization='loss+']"]
PERMUTATION_SPECS = sorted(GRADIENT_METHODS) + MGDA_NORMALIZATIONS
EQUAL_GRADIENT_SPECS = [*sorted(GRADIENT_METHODS), "dbmtl[beta=0.0]", "gradvac[beta=1.0]"]
DEGENERATE_SPECS = [
    *sorted(GRADIENT_METHODS),
    "aligned_mtl[scale='median']",
    "aligned_mtl[scale='rmse']",
    "fairgrad[alpha=0.5]",
    "fairgrad[alpha=3.0]",
    "graddrop[leak=0.1]",
    "moco[lambda_update='softmax', normalize=True]",
    "mgda[normalization='l2']",
]


def _name(spec: str) -> str:
    return split_options(spec)[0]


def _class(name: str) -> type[Any]:
    name = {**{n: p.base for n, p in LOSS_PRESETS.items()}, **{n: p.base for n, p in GRADIENT_PRESETS.items()}}.get(
        name, name
    )
    return tb.loss_class(name) if name in LOSS_METHODS else tb.gradient_class(name)


def _seeded(name: str) -> bool:
    return "seed" in inspect.signature(_class(name.strip()).__init__).parameters


def _make(spec: str, k: int, seed: int = 0) -> tb.Balancer:
    """``tb.make(spec)`` for a name or a ``loss+gradient`` composition, each half seeded when it draws random
    numbers (so that two builds agree), on the engine's rule: ``"auto"`` keeps what it measured in the state, which
    two runs need not share (its own round trip: tests/engine/test_tuning.py)."""
    parts = _name(spec).split("+")
    options: dict[str, Any] = {}
    if len(parts) == 1:
        options = {"seed": seed} if _seeded(parts[0]) else {}
    else:
        loss, gradient = parts
        options["loss_options"] = {"seed": seed} if _seeded(loss) else {}
        options["gradient_options"] = {"seed": seed + 1} if _seeded(gradient) else {}
    balancer = tb.make(spec, n_tasks=k, **options)
    return tb.make(spec, n_tasks=k, engine="heuristic", **options) if balancer.engine == "auto" else balancer


def _gradient(spec: str, k: int) -> GradientBalancer:
    return _make(spec, k).gradient


def test_every_registered_name_is_in_a_contract_table() -> None:
    assert sorted({*LOSS_NAMES, *GRADIENT_NAMES}) == tb.available()
    assert set(PERMUTATION) | set(NOT_EQUIVARIANT) == set(PERMUTATION_SPECS)
    assert set(LOSS_PERMUTATION_EXEMPT) <= set(LOSS_NAMES)


# -- task permutation ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Permutation:
    """How a gradient method is equivariant: its update always (to ``atol`` × max|J|, rtol 1e-7; None = the
    dtype's default tolerance), its weights too when they are unique (``weights``); ``full_rank``: the method
    needs rows that are linearly independent (P ≥ K) for its answer to exist; ``steps``: how many steps each example
    runs (three where the state is a running average that takes a while to matter)."""

    weights: bool = False
    atol: float | None = None
    full_rank: bool = False
    steps: int = 2


PERMUTATION: dict[str, Permutation] = {
    "sum": Permutation(weights=True),
    "aligned_mtl": Permutation(weights=True),
    # CAGrad, IMGrad, MGDA, UPGrad: w is not unique when K > P; the update is
    "cagrad": Permutation(atol=1e-8),
    "imgrad": Permutation(atol=1e-8),
    "mgda": Permutation(atol=1e-7),
    "mgda[normalization='l2']": Permutation(atol=1e-7),
    "mgda[normalization='loss']": Permutation(atol=1e-7),
    "mgda[normalization='loss+']": Permutation(atol=1e-7),
    "upgrad": Permutation(atol=1e-8),
    "config": Permutation(full_rank=True),
    "dbmtl": Permutation(steps=3),
    "fairgrad": Permutation(weights=True, full_rank=True),
    "graddrop": Permutation(),  # its draws are per coordinate, so the same seed gives the same update
    "gradnorm": Permutation(weights=True, steps=3),
    "imtl_g": Permutation(weights=True, full_rank=True),
    "moco": Permutation(weights=True, steps=3),
    "nashmtl": Permutation(weights=True, full_rank=True),
}
#: not equivariant by design (their own tests check equivariance with the orders permuted to match)
NOT_EQUIVARIANT: dict[str, str] = {
    "pcgrad": "each task projects in a random order of the others, drawn per task index",
    "gradvac": "random orders as PCGrad's",
}


@pytest.mark.parametrize("spec", sorted(PERMUTATION))
@FEW
@given(st.integers(0, 2**31), st.integers(2, 6), st.integers(1, 12), st.sampled_from([0.0, 0.5, 1.0]))
def test_gradient_methods_are_task_permutation_equivariant(spec: str, seed: int, k: int, p: int, shift: float) -> None:
    """Over two or three steps (state included): permuting the tasks leaves the update unchanged and permutes w."""
    rule = PERMUTATION[spec]
    p = max(p, k) if rule.full_rank else p
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=gen)
    plain, permuted = _gradient(spec, k), _gradient(spec, k)
    for t in range(rule.steps):
        jac = reference.jacobian(seed + t, k, p, shift)
        losses = torch.rand(k, generator=gen, dtype=F64) + 0.5
        base, other = reference.combine(plain, jac, losses), reference.combine(permuted, jac[perm], losses[perm])
        scale = float(jac.abs().max())
        tolerance: dict[str, Any] = {} if rule.atol is None else {"atol": rule.atol * scale, "rtol": 1e-7}
        torch.testing.assert_close(reference.update(other, jac[perm]), reference.update(base, jac), **tolerance)
        if rule.weights:
            assert base.weights is not None and other.weights is not None
            torch.testing.assert_close(other.weights, base.weights[perm])


#: loss methods that are not equivariant: their weights are random draws in task order
LOSS_PERMUTATION_EXEMPT: dict[str, str] = {
    "rlw": "w = K·softmax(u), u drawn per task index",
    "rlw_si": "as rlw",
    "igbv2": "random weights, then a policy network over the ordered losses",
}


def _loss_run(method: LossBalancer, epochs: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Feed epochs (E × S × K) of losses, with after_step (losses × 0.9) and end_epoch: (w, ℓ̃) per step."""
    out = []
    for steps in epochs:
        for losses in steps:
            balanced = method(losses)
            out.append((balanced.weights, balanced.losses.detach()))
            method.after_step(0.9 * losses)
        method.end_epoch()
    return out


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n not in LOSS_PERMUTATION_EXEMPT])
@FEW
@given(st.integers(0, 2**31), st.integers(1, 5), st.integers(1, 3), st.permutations(range(5)))
def test_loss_methods_are_task_permutation_equivariant(
    name: str, seed: int, k: int, steps: int, order: list[int]
) -> None:
    """Over seven epochs (past every warm-up): permuting the losses permutes w and ℓ̃."""
    perm = [i for i in order if i < k]
    gen = torch.Generator().manual_seed(seed)
    epochs = torch.exp(torch.empty(7, steps, k, dtype=F64).uniform_(-4.6, 4.6, generator=gen))  # L in [0.01, 100]
    plain = _loss_run(_make(name, k).loss.double(), epochs)
    permuted = _loss_run(_make(name, k).loss.double(), epochs[..., perm])
    for (w, balanced), (wp, balanced_p) in zip(plain, permuted, strict=True):
        torch.testing.assert_close(wp, w[perm])
        torch.testing.assert_close(balanced_p, balanced[perm])


# -- equal gradients: the sum convention -----------------------------------------------------------------------------
def _moco_tracking(t: int) -> float:
    """The share of g in MoCo's tracked gradient after t equal steps: y_t = y_{t−1} − β_t (y_{t−1} − g)."""
    remaining = 1.0
    for s in range(1, t + 1):
        remaining *= 1 - 0.5 / math.sqrt(s)
    return 1 - remaining


def _sum(k: int, g: Tensor, t: int) -> Tensor:
    return k * g


def _unit_sqrt_k(k: int, g: Tensor, t: int) -> Tensor:
    update: Tensor = k**0.5 * g / g.norm()
    return update


#: update for K equal gradients g at step t (1-based), where it is not K·g (the sum convention)
EQUAL_GRADIENTS: dict[str, Callable[[int, Tensor, int], Tensor]] = {
    "cagrad": lambda k, g, t: k * 1.4 / 1.16 * g,  # K(1 + c)/(1 + c²)·g, c = 0.4, rescale = 1
    "imgrad": lambda k, g, t: k * 1.8 / 1.64 * g,  # K(1 + α)/(1 + α²)·g, α = 0.8, rescale = 1
    "nashmtl": _unit_sqrt_k,  # scale-free: √K·g/‖g‖ (Gα = 1/α)
    "fairgrad": _unit_sqrt_k,  # α = 1: Gw = 1/w as Nash-MTL's
    "dbmtl": lambda k, g, t: k * (1 - 0.9**t) * g,  # the un-corrected EMA (β = 0.9) reaches K·g geometrically
    "moco": lambda k, g, t: k * _moco_tracking(t) * g,  # the tracked gradients catch up the same way
}


#: (method, dtype) where the default tolerance (float64 rtol 1e-7, float32 1.3e-6) is tighter than the method's own
EQUAL_GRADIENTS_TOLERANCE: dict[tuple[str, torch.dtype], dict[str, Any]] = {
    # equal gradients make the unit-gradient differences vanish: a solve on rounding, up to ~1e-4 of the update
    ("imtl_g", F32): {"rtol": 5e-4, "atol": 1e-5},
    # Newton stops at a relative residual of 1e-6
    ("fairgrad", F64): {"rtol": 1e-6, "atol": 1e-7},
}


@pytest.mark.parametrize("spec", EQUAL_GRADIENT_SPECS)
@FEW
@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 8), st.sampled_from([F32, F64]))
def test_equal_gradients_give_the_sum(spec: str, seed: int, k: int, p: int, dtype: torch.dtype) -> None:
    """K equal gradients g give K·g, over three steps (or what EQUAL_GRADIENTS says the method gives)."""
    g = reference.jacobian(seed, 1, p, dtype=dtype)[0]
    jac = g.repeat(k, 1)
    method = _gradient(spec, k)
    expected = EQUAL_GRADIENTS.get(spec, _sum)
    tolerance = EQUAL_GRADIENTS_TOLERANCE.get((spec, dtype), {})
    for t in range(1, 4):
        update = reference.update(reference.combine(method, jac), jac)
        torch.testing.assert_close(update, expected(k, g, t), **tolerance)


# -- degenerate inputs, both dtypes ----------------------------------------------------------------------------------
#: methods whose weights are never negative
NON_NEGATIVE = {"fairgrad", "gradnorm", "mgda", "moco"}


#: (method, case) pairs left out, and why
DEGENERATE_EXEMPT: dict[tuple[str, str], str] = {
    ("upgrad", "k40"): "float32 K = 40 of rank 7: the QP runs to its iteration limit (~40 s a step, unconverged); "
    "test_upgrad checks K = 40 in float64",
}


@pytest.mark.parametrize(
    ("spec", "case"),
    [(s, c) for s in DEGENERATE_SPECS for c in sorted(DEGENERATE_JACOBIANS) if (s, c) not in DEGENERATE_EXEMPT],
)
def test_degenerate_jacobians_give_finite_updates(spec: str, case: str) -> None:
    """Zero, one zero, parallel, opposite, one 1e6 times longer, K = 1, K = 40 > P, float64: two steps each (three
    for MoCo, whose tracked gradients start at zero)."""
    jac = DEGENERATE_JACOBIANS[case]
    method = _gradient(spec, jac.shape[0])
    for _ in range(3 if _name(spec) == "moco" else 2):
        combination: Combination = reference.combine(method, jac)
        for part in (combination.weights, combination.direction):
            assert part is None or (part.dtype == jac.dtype and torch.isfinite(part).all())
        if _name(spec) in NON_NEGATIVE:
            assert combination.weights is not None and (combination.weights >= 0).all()
        assert torch.isfinite(reference.update(combination, jac)).all()


DEGENERATE_LOSSES: dict[str, list[float]] = {
    "k1": [2.0],
    "equal": [1.5, 1.5, 1.5],
    "twelve decades": [1e-6, 1.0, 1e6],
    "k40": torch.logspace(-3, 3, 40).tolist(),
}


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", sorted(DEGENERATE_LOSSES))
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_degenerate_losses_give_finite_weights(name: str, case: str, dtype: torch.dtype) -> None:
    """K = 1, equal losses, losses twelve decades apart, K = 40: seven epochs of two steps, all finite."""
    values = torch.tensor(DEGENERATE_LOSSES[case], dtype=dtype)
    method = _make(name, len(values)).loss.to(dtype)
    epochs = torch.stack([values, 0.8 * values]).expand(7, 2, len(values))
    for weights, balanced in _loss_run(method, epochs):
        assert weights.dtype == balanced.dtype == dtype
        assert torch.isfinite(weights).all() and torch.isfinite(balanced).all()


# -- through the Balancer: a linear model whose per-task gradients are given -----------------------------------------
P = 6


def _drive(balancer: tb.Balancer, k: int, dtype: torch.dtype, steps: range) -> list[Tensor]:
    """Balancer.backward on ℓ_k = J_t[k]·z + L_t[k], z = θ (the features), two steps an epoch, with after_step and
    the methods' own parameters stepped by SGD: (update of θ, weights) per step, flattened."""
    out = []
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        jac = reference.jacobian(1000 + t, k, P, 0.5, dtype)
        values = torch.rand(k, generator=gen, dtype=dtype) + 0.5
        theta = torch.zeros(P, dtype=dtype, requires_grad=True)
        features = theta * 1.0
        result = balancer.backward(jac @ features + values, [theta], features=features)
        with torch.no_grad():
            for param in balancer.parameters():
                if param.grad is not None:
                    param.sub_(0.1 * param.grad)
                    param.grad = None
        balancer.after_step(0.9 * values)
        if t % 2 == 1:
            balancer.end_epoch()
        out.append(torch.cat([reference.accumulated([theta]), result.weights]))
    return out


#: every name, STCH past its warm-up within the run, and compositions: both halves' state, and the Balancer's
#: own (the reused weights of update_weights_every)
STATE_SPECS = [
    *(n for n in tb.available() if n != "stch"),
    "stch[warmup_epochs=1]",
    "igbv1+nashmtl",
    "nashmtl[update_weights_every=2]",
    "igbv1+upgrad[update_weights_every=3]",
    "famo+dbmtl",
    "rlw+pcgrad",
    "uw+gradvac",
]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", STATE_SPECS)
def test_state_round_trip_mid_run(name: str, dtype: torch.dtype) -> None:
    """Saved after five steps (torch.save, weights_only load) into a differently seeded Balancer, the next four
    steps are bit-identical, and so is the state after them. Both dtypes give finite updates and weights of that
    dtype."""
    k = 3
    balancer = _make(name, k, seed=3).to(dtype)
    _drive(balancer, k, dtype, range(5))  # mid-epoch: epoch accumulators are part of the state
    saved = reference.roundtrip(balancer.state_dict())
    resumed = _make(name, k, seed=4).to(dtype)
    resumed.load_state_dict(saved)
    assert reference.same(resumed.state_dict(), saved)
    for a, b in zip(_drive(balancer, k, dtype, range(5, 9)), _drive(resumed, k, dtype, range(5, 9)), strict=True):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert torch.equal(a, b)
    assert reference.same(balancer.state_dict(), resumed.state_dict())


#: known departures from "reset() gives the fresh state"
RESET_DEFECTS: dict[tuple[str, torch.dtype], str] = {}


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        pytest.param(n, d, marks=[pytest.mark.xfail(strict=True, reason=RESET_DEFECTS[n, d])])
        if (n, d) in RESET_DEFECTS
        else pytest.param(n, d)
        for n in STATE_SPECS
        for d in (F32, F64)
    ],
)
def test_reset_returns_to_the_fresh_state(name: str, dtype: torch.dtype) -> None:
    """After four steps, reset() gives the state of a fresh build and replays the first steps exactly."""
    balancer = _make(name, 3).to(dtype)
    fresh_state = reference.roundtrip(balancer.state_dict())
    first = _drive(balancer, 3, dtype, range(4))
    balancer.reset()
    assert reference.same(balancer.state_dict(), fresh_state)
    for a, b in zip(first, _drive(balancer, 3, dtype, range(4)), strict=True):
        assert torch.equal(a, b)


# -- the Balancer applies what the method returns --------------------------------------------------------------------
#: on TinyMTL against the method run on J from autograd; solver-based methods meet a solve on a J that differs from
#: the engine's in rounding, hence the looser tolerance (None: float32's default)
APPLIED_TOLERANCE: dict[str, dict[str, Any]] = {
    "cagrad": {"rtol": 1e-4, "atol": 1e-5},
    "imgrad": {"rtol": 1e-4, "atol": 1e-5},
    "mgda": {"rtol": 1e-5, "atol": 1e-6},
    "upgrad": {"rtol": 1e-4, "atol": 1e-5},
    "imtl_g": {"rtol": 1e-4, "atol": 1e-5},
}
#: gradient methods the Balancer does not apply to θ's gradients as they are
NOT_APPLIED_TO_THETA = {
    "mgda_ub": "the method reads ∂ℓ̃/∂z of the features (an approximation; the engine tests check the path)",
    "aligned_mtl_ub": "as mgda_ub",
    "sum": "one ordinary backward of Σℓ̃ (the engine tests check it)",
}


@pytest.mark.parametrize("name", [n for n in GRADIENT_NAMES if n not in NOT_APPLIED_TO_THETA])
def test_balancer_applies_the_methods_update(name: str) -> None:
    """Three SGD steps on TinyMTL: θ.grad is the method's update on J (clipped to its max_norm), the heads get
    ∇Σℓ̃, the reported gradient weights are the method's; the reference is a second build run by hand."""
    model, (x, y) = TinyMTL(), make_data()
    shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    balancer, twin = _make(name, 3, seed=4), _make(name, 3, seed=4)
    tolerance = APPLIED_TOLERANCE.get(name, {})
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        _, losses = task_losses(model, x, y)
        balanced = twin.loss(losses).losses
        jac = reference.autograd_jacobian(balanced, shared)
        expected = reference.combine(twin.gradient, jac, balanced.detach())
        head_grad = reference.flat_grad(balanced.sum(), heads)
        result = balancer.backward(losses, shared)
        assert result.converged == expected.converged, result.note
        update = clip_update(reference.update(expected, jac), twin.gradient.max_norm)
        torch.testing.assert_close(reference.accumulated(shared), update, **tolerance)
        torch.testing.assert_close(reference.accumulated(heads), head_grad)
        if expected.weights is None:
            assert result.gradient_weights is None
        else:
            assert result.gradient_weights is not None
            torch.testing.assert_close(result.gradient_weights, expected.weights, **tolerance)
        with torch.no_grad():
            for p in model.parameters():
                assert p.grad is not None
                p.sub_(0.05 * p.grad)


# -- repr ------------------------------------------------------------------------------------------------------------
#: options a method's repr leaves out, and why
REPR_OMITS: dict[str, set[str]] = {
    "igbv2": {"hidden", "lr", "gamma", "tau", "init_alpha", "reward_scale"},  # the SAC agent's and a mutable scale
}
#: options whose default (None) is replaced by a value drawn at construction, which the repr shows
DRAWN = {"seed"}


@pytest.mark.parametrize("name", sorted({*LOSS_METHODS, *GRADIENT_METHODS}))
def test_repr_names_every_option_with_its_value(name: str) -> None:
    balancer = tb.make(name, n_tasks=2)
    method = balancer.loss if name in LOSS_METHODS else balancer.gradient
    text = repr(method)
    assert text.startswith(type(method).__name__) and "n_tasks=2" in text
    for option, parameter in inspect.signature(type(method).__init__).parameters.items():
        if option in {"self", "n_tasks"} | REPR_OMITS.get(name, set()):
            continue
        if option in DRAWN or parameter.default is inspect.Parameter.empty:
            assert f"{option}=" in text, (option, text)
        else:
            assert f"{option}={parameter.default!r}" in text, (option, text)
    assert repr(method) in repr(balancer)


@pytest.mark.parametrize("name", sorted(n for n in GRADIENT_METHODS if tb.gradient_class(n).needs == "gramian"))
def test_a_method_reading_g_gives_the_same_weights_in_inference_mode(name: str) -> None:
    """Calling a method that reads G runs its ``combine`` under ``torch.inference_mode`` (the dispatch cost of its
    K × K operations): the weights equal those of ``combine`` run in grad mode bit for bit, step after step (the
    state it keeps feeds the next step), and they leave as an ordinary tensor a loss can be multiplied by and
    differentiated through."""
    k, generator = 3, torch.Generator().manual_seed(5)
    fast, plain = _gradient(name, k), _gradient(name, k)
    base = torch.randn(k, 12, generator=generator, dtype=F64)
    for _ in range(6):
        jacobian = base + 0.5 * torch.randn(k, 12, generator=generator, dtype=F64)
        gramian, losses = jacobian @ jacobian.T, torch.rand(k, generator=generator, dtype=F64) + 0.5
        called, combined = fast(gramian, losses), plain.combine(gramian, losses)
        assert called.weights is not None and combined.weights is not None
        assert torch.equal(called.weights, combined.weights)
        assert not called.weights.is_inference()
    head = torch.ones(k, dtype=F64, requires_grad=True)
    (called.weights * head).sum().backward()  # an inference tensor could not be saved for this backward
    assert head.grad is not None and torch.equal(head.grad, called.weights)
