"""Bad input never changes anything: for every spec and every kind of bad input, one clear error and no trace.

After a few good steps (so that every method has history, and the optimizer state), each bad call must raise a
ValueError or TypeError whose message names the cause, and leave ``balancer.state_dict()``, every ``.grad``,
every parameter and the optimizer's state bit-identical to before. Where the input is numeric, hypothesis picks
the bad task and the bad value.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import taskbalance as tb
from tests.models import TinyMTL, make_data, task_losses
from tests.test_method_state import OPTIONS as PHASES

K = 3
SPECS = [*tb.available(), "igbv1+nashmtl", "igbv2+cagrad", "igbv1+imgrad"]
#: options that give every method history within the few good steps (IGBv2 through SAC into its policy)
OPTIONS: dict[str, dict[str, Any]] = {**PHASES, "igbv1": {"base_epoch": 0}}
EPOCHS, STEPS = 3, 2
EXAMPLES = settings(max_examples=3, deadline=None, derandomize=True)


def _options(spec: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in spec.split("+"):
        options.update(OPTIONS.get(name, {}))
    return options


@dataclass
class Run:
    """A balancer after a few good steps of a tiny model, with its optimizer; the next batch's inputs."""

    spec: str
    balancer: tb.Balancer
    model: TinyMTL
    optimizer: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    _features: Tensor | None = None

    @property
    def per_task(self) -> bool:
        return self.balancer.gradient.needs != "nothing"

    def forward(self) -> tuple[Tensor, Tensor]:
        return task_losses(self.model, self.x, self.y)

    def shared(self) -> list[Tensor]:
        return list(self.model.encoder.parameters())

    def backward(self, losses: Tensor, shared: list[Tensor] | None = None) -> None:
        """``balancer.backward`` with the features of the last :meth:`prepare`."""
        self.balancer.backward(losses, self.shared() if shared is None else shared, features=self._features)

    def prepare(self) -> Tensor:
        """The next batch's losses (features kept for :meth:`backward`)."""
        self._features, losses = self.forward()
        return losses


def _train(spec: str) -> Run:
    torch.manual_seed(0)
    engine = {} if spec.endswith("_ub") else {"engine": "features"}
    balancer = tb.make(spec, n_tasks=K, **_options(spec), **engine)
    if balancer.gradient.needs == "nothing":
        balancer = tb.make(spec, n_tasks=K, **_options(spec))
    model = TinyMTL(K)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-2)
    x, y = make_data(K, n=8)
    for _ in range(EPOCHS):
        for _ in range(STEPS):
            optimizer.zero_grad()
            z, losses = task_losses(model, x, y)
            balancer.backward(losses, model.encoder.parameters(), features=z)
            optimizer.step()
            with torch.no_grad():
                balancer.after_step(task_losses(model, x, y)[1])
        balancer.end_epoch()
    # one more backward: .grad is set when the bad call comes
    optimizer.zero_grad()
    z, losses = task_losses(model, x, y)
    balancer.backward(losses, model.encoder.parameters(), features=z)
    return Run(spec, balancer, model, optimizer, x, y)


def _bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _everything(run: Run) -> list[Any]:
    grads = [None if p.grad is None else p.grad.clone() for p in [*run.model.parameters(), *run.balancer.parameters()]]
    params = [p.detach().clone() for p in [*run.model.parameters(), *run.balancer.parameters()]]
    return [_bytes(run.balancer.state_dict()), _bytes(run.optimizer.state_dict()), grads, params]


def _assert_unchanged(before: list[Any], run: Run) -> None:
    after = _everything(run)
    assert after[0] == before[0], "the balancer's state_dict changed"
    assert after[1] == before[1], "the optimizer's state changed"
    for name, old, new in (("grad", before[2], after[2]), ("parameter", before[3], after[3])):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            assert (a is None) == (b is None), f"{name} {i} appeared or vanished"
            if a is not None:
                assert torch.equal(a, b), f"{name} {i} changed"


def _refused(run: Run, call: Callable[[], object], message: str, error: type[Exception] = ValueError) -> None:
    before = _everything(run)
    with pytest.raises(error, match=message):
        call()
    _assert_unchanged(before, run)


_RUNS: dict[str, Run] = {}


def _run(spec: str) -> Run:
    """The trained run of a spec, shared by its cases: every case leaves it as it found it, or fails."""
    if spec not in _RUNS:
        _RUNS[spec] = _train(spec)
    return _RUNS[spec]


def _methods(balancer: tb.Balancer) -> tuple[str, str]:
    return repr(balancer.loss), repr(balancer.gradient)


def _tasks() -> st.SearchStrategy[int]:
    return st.integers(0, K - 1)


def _with(losses: Tensor, task: int, value: float) -> Tensor:
    mask = torch.zeros(K, dtype=torch.bool)
    mask[task] = True
    return torch.where(mask, torch.full((K,), value), losses)


def _added(losses: Tensor, task: int, term: Tensor) -> Tensor:
    """``term`` added to one task's loss only (a multiplication by a one-hot would reach every task with 0·NaN)."""
    return torch.stack([loss + term if k == task else loss for k, loss in enumerate(losses.unbind())])


# -- the cases ------------------------------------------------------------------------------------------------
def case_wrong_shape(run: Run) -> None:
    losses = run.prepare()
    _refused(run, lambda: run.backward(losses[:2]), r"shape \(3,\)")
    _refused(run, lambda: run.backward(losses.reshape(K, 1)), r"shape \(3,\)")
    _refused(run, lambda: run.balancer.after_step(losses.detach()[:2]), r"shape \(3,\)")


def case_non_finite_loss(run: Run) -> None:
    @EXAMPLES
    @given(_tasks(), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    def check(task: int, value: float) -> None:
        losses = _with(run.prepare(), task, value)
        _refused(run, lambda: run.backward(losses), rf"non-finite loss .* task\(s\) \[{task}\]")
        _refused(run, lambda: run.balancer.after_step(losses.detach()), rf"task\(s\) \[{task}\]")

    check()


def case_non_positive_loss(run: Run) -> None:
    if not run.balancer.loss.takes_log:
        pytest.skip("the method takes no log: any finite loss is valid")

    @EXAMPLES
    @given(_tasks(), st.sampled_from([0.0, -0.0, -1e-12, -3.0]))
    def check(task: int, value: float) -> None:
        losses = _with(run.prepare(), task, value)
        _refused(run, lambda: run.backward(losses), rf"task\(s\) \[{task}\] have loss <= 0")
        _refused(run, lambda: run.balancer.after_step(losses.detach()), rf"task\(s\) \[{task}\] have loss <= 0")

    check()


def case_losses_without_grad(run: Run) -> None:
    losses = run.prepare()
    _refused(run, lambda: run.backward(losses.detach()), "do not require grad")
    _refused(run, lambda: run.backward([1.0, 2.0, 3.0]), "sequence of K scalar tensors", TypeError)  # type: ignore[arg-type]


def case_shared_without_path(run: Run) -> None:
    losses = run.prepare()
    stray = nn.Parameter(torch.ones(2))
    _refused(run, lambda: run.backward(losses, [*run.shared(), stray]), r"positions \[4\] have no gradient path")


def case_duplicate_shared(run: Run) -> None:
    losses = run.prepare()
    shared = run.shared()
    _refused(run, lambda: run.backward(losses, [*shared, shared[0]]), r"positions \[0, 4\] are the same tensor")


def case_non_finite_gradient(run: Run) -> None:
    """1e-30·√u at u = 0 (u depends on the shared features): the loss is finite, its gradient is NaN."""

    @EXAMPLES
    @given(_tasks())
    def check(task: int) -> None:
        z, losses = run.forward()
        kink = 1e-30 * torch.sqrt((z - z.detach()).pow(2).sum())
        losses = _added(losses, task, kink)
        run._features = z
        # a zero cotangent through √u at 0 is 0/0 = NaN too, so other tasks' computed gradients may be NaN as well
        named = rf"task\(s\) \[[0-9, ]*\b{task}\b" if run.per_task else "non-finite"
        _refused(run, lambda: run.backward(losses), named)

    check()


def case_overflowing_gradient(run: Run) -> None:
    """A finite float32 gradient of norm ~1e21: G = J Jᵀ overflows for every method that reads J or G."""
    if not run.per_task:
        pytest.skip("no per-task gradients, no Gramian: a large finite gradient is applied as it is")

    @EXAMPLES
    @given(_tasks(), st.sampled_from([1e20, 1e25]))
    def check(task: int, scale: float) -> None:
        z, losses = run.forward()
        steep = scale * (z - z.detach()).sum()
        losses = _added(losses, task, steep)
        run._features = z
        _refused(run, lambda: run.backward(losses), rf"task\(s\) \[{task}\] is finite but too large")

    check()


def case_bad_features(run: Run) -> None:
    if not run.per_task:
        pytest.skip("no per-task gradients: features are not read")
    losses = run.prepare()
    _refused(run, lambda: run.balancer.backward(losses, run.shared(), features=None), "no features were given")
    z, losses = run.forward()
    _refused(run, lambda: run.balancer.backward(losses, run.shared(), features=z.detach()), "no grad_fn")


def case_foreign_state(run: Run) -> None:
    @EXAMPLES
    @given(st.sampled_from(SPECS))
    def check(other: str) -> None:
        foreign = _run(other).balancer
        if _methods(foreign) == _methods(run.balancer):
            return  # the same methods with the same options ("ew" and "sum"; only the engine path differs): not foreign
        _refused(run, lambda: run.balancer.load_state_dict(foreign.state_dict()), "state is for")

    check()


def case_other_number_of_tasks(run: Run) -> None:
    losses = run.prepare()
    _refused(run, lambda: run.backward(torch.cat([losses, losses[:1]])), r"shape \(3,\)")
    other = tb.make(run.spec, n_tasks=K + 1, **_options(run.spec))
    _refused(run, lambda: run.balancer.load_state_dict(other.state_dict()), "tasks")


CASES = {name.removeprefix("case_"): case for name, case in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spec", SPECS)
def test_bad_input_raises_and_changes_nothing(spec: str, case: str) -> None:
    run = _run(spec)
    CASES[case](run)
    # and the run goes on: a good step still works
    losses = run.prepare()
    run.backward(losses)
