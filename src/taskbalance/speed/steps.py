"""The timed steps: EW, the cost floor's candidates, every registered method, amortised and torchjd variants.

A step is what a training loop runs: forward, the method's backward, an optimizer step (SGD with lr 0: the same
work as a real step, and the model stays the one every method sees), ``zero_grad``; FAMO adds its ``after_step``
forward under the updated model, part of its definition. Each step owns a copy of the model and its own Balancer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import registry
from ..balancer import Balancer
from ..engine import PathTuner
from ..engine.tuning import TRIAL_STEPS
from ..gradient_balancing.base import Combination, GradientBalancer
from ..loss_balancing.base import LossBalancer
from . import torchjd_steps
from .cases import SpeedCase
from .timing import Step, timed_call

Kind = Literal["ew", "floor", "loss", "gradient", "representation", "amortised", "torchjd"]

#: a Balancer engine path timed with w = 1 for the cost floor (the exact paths, and what "auto" chose among them)
FLOOR_PATHS = ("loop", "batched", "features_loop", "features", "gramian", "auto")
#: IGBv2's SAC updates come every ``update_every`` steps: it is timed over that many steps, at a full buffer
IGBV2_OPTIONS: dict[str, Any] = {"base_epoch": 0, "train_epoch": 1, "policy_epoch": 1, "buffer_size": 128}
AMORTISED_EVERY = 10


class FixedWeights(GradientBalancer):
    """w = 1 through the engine: the cost of the per-task gradients and of applying them, with no solver."""

    name: ClassVar[str] = "fixed"
    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        return Combination(weights=torch.ones(self.n_tasks, dtype=matrix.dtype, device=matrix.device))


class FixedJacobianWeights(FixedWeights):
    """w = 1 for a method that reads J: what ``"auto"`` times for the methods that read J."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"


def auto_trial(case: SpeedCase, device: torch.device) -> PathTuner:
    """What ``engine="auto"`` measures on the case, for the methods that read G and for those that read J: one
    trial each (w = 1), whose choices every timed Balancer then starts from (a trial per method would time the
    candidates about 40 times on each model, to the same verdict: the graph is the same)."""
    tuner = PathTuner()
    for fixed in (FixedWeights(), FixedJacobianWeights()):
        balancer = Balancer(gradient=fixed, n_tasks=case.n_tasks, engine="auto")
        step = balancer_step(case, balancer, device)
        for _ in range(TRIAL_STEPS):
            step()
        tuner.chosen.update(balancer.path_tuner.chosen)
        tuner.timings.update(balancer.path_tuner.timings)
        tuner.dropped.update(balancer.path_tuner.dropped)
    return tuner


@dataclass
class Entry:
    """One row of the benchmark: a step to time, what kind of entry it is, and what it compares with."""

    name: str
    kind: Kind
    step: Step
    #: steps per timed call (IGBv2: its SAC update period), the time is divided by it
    period: int = 1
    #: solver times (ms) recorded by the step, for gradient methods
    solve_ms: list[float] = field(default_factory=list)
    #: the torchjd entry this one is compared with
    torchjd: str = ""
    #: whether the method solves a small K × K problem from G (the solver target applies), not O(K·P) work on J
    reads_gramian: bool = False


def encoder(model: nn.Module) -> nn.Module:
    """The shared part of a case's model."""
    shared = model.encoder
    assert isinstance(shared, nn.Module)
    return shared


def _timed_solver(method: GradientBalancer, record: list[float], device: torch.device) -> None:
    """Record the time of every ``combine`` call of ``method`` (:func:`~.timing.timed_call`: on CUDA the solver's
    whole cost, host and device)."""
    combine = method.combine

    def timed(matrix: Tensor, losses: Tensor) -> Combination:
        result, ms = timed_call(lambda: combine(matrix, losses), device)
        record.append(ms)
        return result

    method.combine = timed  # type: ignore[method-assign]


def _needs_after_step(loss: LossBalancer) -> bool:
    return type(loss).after_step is not LossBalancer.after_step


def balancer_step(case: SpeedCase, balancer: Balancer, device: torch.device) -> Step:
    model = copy.deepcopy(case.model)
    balancer.to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.0)
    shared = list(encoder(model).parameters())
    after = _needs_after_step(balancer.loss)

    def step() -> None:
        features, losses = case.losses(model)
        balancer.backward(losses, shared, features=features)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after:
            with torch.no_grad():
                balancer.after_step(case.losses(model)[1])

    return step


def prime(step: Step, balancer: Balancer, epochs: int = 3, per_epoch: int = 2) -> None:
    """A few short epochs, so that epoch-based methods (DWA, IGBv1, IGBv2) reach their steady state."""
    for _ in range(epochs):
        for _ in range(per_epoch):
            step()
        balancer.end_epoch()


def raw_step(case: SpeedCase, batched: bool) -> Step:
    """The K per-task gradients of every parameter by plain autograd, applied nowhere: the usual ways to get J."""
    model = copy.deepcopy(case.model)
    inputs = list(model.parameters())
    k = case.n_tasks
    eye = torch.eye(k, device=next(model.parameters()).device)

    def step() -> None:
        losses = torch.stack(case.losses(model)[1])
        if batched:
            torch.autograd.grad(losses, inputs, eye, is_grads_batched=True, allow_unused=True)
        else:
            for t in range(k):
                torch.autograd.grad(losses[t], inputs, retain_graph=t < k - 1, allow_unused=True)

    return step


def torchjd_step(case: SpeedCase, factory: Callable[[], Any]) -> Step:
    model = copy.deepcopy(case.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    shared = list(encoder(model).parameters())
    aggregator = factory()

    def step() -> None:
        features, losses = case.losses(model)
        torchjd_steps.backward(losses, features, shared, aggregator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _method(case: SpeedCase, spec: str, device: torch.device, **options: Any) -> tuple[Step, Balancer]:
    balancer = registry.make(spec, n_tasks=case.n_tasks, **options)
    return balancer_step(case, balancer, device), balancer


def gradient_specs() -> list[str]:
    """Every registered gradient method and gradient preset, by spec (``sum`` is EW)."""
    names = [n for n in registry.GRADIENT_METHODS if n != "sum" and n not in registry.GRADIENT_PRESETS]
    return [*names, *registry.GRADIENT_PRESETS]


def loss_specs() -> list[str]:
    return [n for n in [*registry.LOSS_METHODS, *registry.LOSS_PRESETS] if n != "ew"]


def timed_specs() -> list[str]:
    """Every spec the benchmark times (EW always, as the reference), each by its registered name."""
    return ["ew", *loss_specs(), *gradient_specs()]


def entries(
    case: SpeedCase,
    device: torch.device,
    with_torchjd: bool,
    methods: set[str] | None,
    auto: PathTuner | None = None,
) -> list[Entry]:
    """Every step of a case; epoch-based loss methods are primed into their steady state, and every Balancer on
    ``engine="auto"`` starts from the choices of the case's trial (``auto``; :func:`auto_trial` when None)."""
    out: list[Entry] = []
    choices = (auto_trial(case, device) if auto is None else auto).chosen

    def add(name: str, kind: Kind, step: Step, balancer: Balancer | None = None, **extra: Any) -> None:
        if balancer is not None and balancer.engine == "auto":
            balancer.path_tuner.chosen.update(choices)
        if balancer is not None and type(balancer.loss).end_epoch is not LossBalancer.end_epoch:
            prime(step, balancer)
        out.append(Entry(name, kind, step, **extra))

    ew_step, ew = _method(case, "ew", device)
    add("ew", "ew", ew_step, ew)
    add("raw loop", "floor", raw_step(case, batched=False))
    add("raw batched", "floor", raw_step(case, batched=True))
    for path in FLOOR_PATHS:
        balancer = Balancer(gradient=FixedWeights(), n_tasks=case.n_tasks, engine=path)  # type: ignore[arg-type]
        add(f"engine {path} (w = 1)", "floor", balancer_step(case, balancer, device), balancer)

    def wanted(name: str) -> bool:
        return methods is None or name in methods

    for spec in loss_specs():
        if wanted(spec):
            options = IGBV2_OPTIONS if spec == "igbv2" else {}
            step, balancer = _method(case, spec, device, **options)
            period = int(getattr(balancer.loss, "update_every", 1)) if spec == "igbv2" else 1
            add(spec, "loss", _repeat(step, period), balancer, period=period)
    fixed = Balancer(gradient=FixedWeights(), n_tasks=case.n_tasks, engine="representation")
    add("representation (w = 1)", "representation", balancer_step(case, fixed, device), fixed)
    jd = set(torchjd_steps.aggregators(case.n_tasks)) if with_torchjd else set()
    for spec in gradient_specs():
        if not wanted(spec):
            continue
        step, balancer = _method(case, spec, device)
        preset = registry.GRADIENT_PRESETS.get(spec)
        kind: Kind = "representation" if preset and preset.balancer.get("engine") == "representation" else "gradient"
        solves: list[float] = []
        _timed_solver(balancer.gradient, solves, device)
        reads_gramian = balancer.gradient.needs == "gramian"
        torchjd = f"torchjd {spec}" if spec in jd else ""
        add(spec, kind, step, balancer, solve_ms=solves, torchjd=torchjd, reads_gramian=reads_gramian)
        if kind == "gradient" and balancer.gradient.needs == "gramian":
            step, balancer = _method(case, spec, device, update_weights_every=AMORTISED_EVERY)
            add(f"{spec} (N = {AMORTISED_EVERY})", "amortised", step, balancer)
    if with_torchjd:
        for spec, factory in torchjd_steps.aggregators(case.n_tasks).items():
            if spec == "ew" or wanted(spec):
                add(f"torchjd {spec}", "torchjd", torchjd_step(case, factory))
        next(e for e in out if e.name == "ew").torchjd = "torchjd ew"
    for entry in out:
        entry.solve_ms.clear()  # priming solves are warm-up
    return out


def _repeat(step: Step, times: int) -> Step:
    if times == 1:
        return step

    def repeated() -> None:
        for _ in range(times):
            step()

    return repeated
