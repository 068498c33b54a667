"""The Balancer contract: validation, composition seam, result object, state."""

from __future__ import annotations

import io

import pytest
import torch

import taskbalance as tb
from taskbalance.engine import Engine
from taskbalance.registry import GRADIENT_METHODS, spec_engine
from tests.models import TinyMTL, make_data, task_losses


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _plain_backward(model: TinyMTL, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Every parameter's gradient from an ordinary backward of Σ L; the model's .grad are then cleared."""
    _, losses = task_losses(model, x, y)
    torch.autograd.backward(losses.sum())
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    return expected


def test_ew_equals_plain_sum_backward() -> None:
    model = TinyMTL()
    x, y = make_data()
    expected = _plain_backward(model, x, y)
    _, losses = task_losses(model, x, y)
    balancer = tb.make("ew", n_tasks=3)
    result = balancer.backward(losses, model.encoder.parameters())
    assert balancer._engine.last_path == "sum"  # Sum needs nothing: no per-task gradients
    for a, b in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(result.weights, torch.ones(3))
    torch.testing.assert_close(result.losses, losses.detach())


def test_engine_sum_path_equals_plain_backward() -> None:
    """The gradient-method seam (J, then Jᵀw, heads get ∇Σℓ̃) reproduces an ordinary backward for Sum."""
    model = TinyMTL()
    x, y = make_data()
    expected = _plain_backward(model, x, y)
    _, losses = task_losses(model, x, y)
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    balancer = tb.Balancer(n_tasks=3)
    engine = Engine()
    engine(losses, shared, heads, balancer.gradient)  # Sum, handed G: w = 1
    assert engine.last_path == "loop"  # the per-task path (CPU), not the plain backward
    for a, b in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(a, b)


def test_gradients_accumulate_like_backward() -> None:
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("ew", n_tasks=3)
    for _ in range(2):
        _, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters())
    twice = _grads(model)
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    torch.autograd.backward(2 * losses.sum())
    for a, b in zip(twice, _grads(model), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda losses: losses[:2], r"shape \(3,\)"),
        (lambda losses: losses.reshape(3, 1), r"shape \(3,\)"),
        (lambda losses: losses * torch.tensor([1.0, float("nan"), 1.0]), r"task\(s\) \[1\]"),
        (lambda losses: losses * torch.tensor([1.0, 1.0, float("inf")]), r"task\(s\) \[2\]"),
        (lambda losses: losses.detach(), "do not require grad"),
    ],
)
def test_bad_losses_raise_and_change_nothing(bad, message) -> None:  # type: ignore[no-untyped-def]
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("ew", n_tasks=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match=message):
        balancer.backward(bad(losses), model.encoder.parameters())
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def _saved(balancer: tb.Balancer) -> bytes:
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("engine", "features", "message"),
    [
        ("features", "detached", "not the output of a differentiable computation"),
        ("features", "none", "no features were given"),
        ("representation", "none", "no features were given"),
        ("features", "bypassed", r"positions \[4\] reach the losses without passing through features"),
    ],
)
def test_engine_refusal_comes_before_any_state_changes(engine: str, features: str, message: str) -> None:
    """A call the engine cannot serve raises before the loss method (IGBv1's baseline) or the call count moves."""
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("igbv1+mgda", n_tasks=3, engine=engine)
    z, losses = task_losses(model, x, y)
    balancer.backward(losses, model.encoder.parameters(), features=z)
    state, grads = _saved(balancer), _grads(model)
    z, losses = task_losses(model, x, y)
    shared = list(model.encoder.parameters())
    given = {"detached": z.detach(), "none": None, "bypassed": z}[features]
    if features == "bypassed":
        shared.append(next(model.heads.parameters()))  # head 0's weight: reaches its loss around z
    with pytest.raises(ValueError, match=message):
        balancer.backward(losses, shared, features=given)
    assert _saved(balancer) == state
    for a, b in zip(_grads(model), grads, strict=True):
        assert torch.equal(a, b)


def test_shared_parameter_without_gradient_path_is_refused() -> None:
    model = TinyMTL()
    x, y = make_data()
    stray = torch.nn.Parameter(torch.ones(2))
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match=r"positions \[4\] have no gradient path"):
        tb.make("ew", n_tasks=3).backward(losses, [*model.encoder.parameters(), stray])
    assert all(p.grad is None for p in model.parameters())


def test_frozen_shared_parameter_is_refused() -> None:
    model = TinyMTL()
    x, y = make_data()
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="do not require grad"):
        tb.make("ew", n_tasks=3).backward(losses, [torch.zeros(2)])


def test_sequence_of_scalars_is_accepted() -> None:
    model = TinyMTL()
    x, y = make_data()
    _, losses = task_losses(model, x, y)
    result = tb.make("ew", n_tasks=3).backward(list(losses), model.encoder.parameters())
    assert result.weights.shape == (3,)


def test_fixed_weights() -> None:
    model = TinyMTL()
    x, y = make_data()
    _, losses = task_losses(model, x, y)
    torch.autograd.backward(0.5 * losses[0] + 2.0 * losses[2])
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    tb.Balancer(loss=tb.Equal([0.5, 0.0, 2.0]), n_tasks=3).backward(losses, model.encoder.parameters())
    for a, b in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="2 fixed weights for 3 tasks"):
        tb.Balancer(loss=tb.Equal([1.0, 1.0]), n_tasks=3)


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="positive int"):
        tb.Balancer(n_tasks=0)
    with pytest.raises(ValueError, match="unknown engine"):
        tb.Balancer(n_tasks=2, engine="magic")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LossBalancer"):
        tb.Balancer(loss=tb.Sum(), n_tasks=2)  # type: ignore[arg-type]


# -- issue 12: a repeated shared parameter, transactions, finite gradients ------------------------------------
GRADIENT_SPECS = [f"ew+{name}" for name in GRADIENT_METHODS if name != "sum"]
#: the methods that wrote NaN into .grad for a non-finite gradient of finite losses (issue 12, item 8)
WROTE_NAN = [f"ew+{name}" for name in ("aligned_mtl", "config", "fairgrad", "graddrop", "gradnorm", "gradvac")]
WROTE_NAN += ["dbmtl", "ew+moco", "ew+pcgrad"]


@pytest.mark.parametrize("spec", [*GRADIENT_SPECS, "ew", "mgda_ub"])
def test_a_shared_parameter_listed_twice_is_refused(spec: str) -> None:
    """[w, b, w] would put w's gradient into J twice (MGDA's update exactly doubled): refused, naming both."""
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make(spec, n_tasks=3)
    z, losses = task_losses(model, x, y)
    shared = list(model.encoder.parameters())
    state = _saved(balancer)
    with pytest.raises(ValueError, match=r"positions \[0, 4\] are the same tensor"):
        balancer.backward(losses, [*shared, shared[0]], features=z)
    assert _saved(balancer) == state
    assert all(p.grad is None for p in model.parameters())


def test_parameters_sharing_memory_are_refused_but_disjoint_views_are_not() -> None:
    flat = torch.randn(7)
    w = torch.nn.Parameter(flat[:4].view(2, 2))
    alias = torch.nn.Parameter(flat[1:3])  # inside w's memory
    b = torch.nn.Parameter(flat[4:7])  # next to w, disjoint
    x = torch.randn(5, 2)
    losses = torch.stack([(x @ w).sum() + alias.sum(), (x @ w).pow(2).mean() + b.sum()])
    balancer = tb.make("mgda", n_tasks=2)
    with pytest.raises(ValueError, match=r"positions \[0, 1\] are the same tensor \(or share memory\)"):
        balancer.backward(losses, [w, alias, b])
    balancer.backward(losses, [w, b])  # carved from one buffer without overlap: two parameters
    assert w.grad is not None and b.grad is not None


def test_a_method_that_fails_mid_way_leaves_no_trace() -> None:
    """MoCo raises after its tracked gradients and λ moved: the Balancer restores them and writes no .grad."""
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("famo+moco", n_tasks=3, update_weights_every=1)
    for _ in range(2):
        z, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters(), features=z)
    state, grads = _saved(balancer), _grads(model)
    original = balancer.gradient.combine

    def fails(matrix: torch.Tensor, losses: torch.Tensor) -> object:
        original(matrix, losses)  # the method's state moves
        raise RuntimeError("solver failed")

    balancer.gradient.combine = fails  # type: ignore[method-assign,assignment]
    z, losses = task_losses(model, x, y)
    with pytest.raises(RuntimeError, match="solver failed"):
        balancer.backward(losses, model.encoder.parameters(), features=z)
    assert _saved(balancer) == state  # FAMO's previous losses, MoCo's tracked gradients
    for a, b in zip(_grads(model), grads, strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_is_all_or_nothing() -> None:
    """A state whose loss part fits but whose gradient part is foreign leaves the call count and w untouched."""
    model = TinyMTL()
    x, y = make_data()
    target = tb.make("igbv1+mgda", n_tasks=3, base_epoch=0, update_weights_every=3)
    source = tb.make("igbv1+upgrad", n_tasks=3, base_epoch=0, update_weights_every=2)
    for balancer, steps in ((target, 2), (source, 5)):
        for _ in range(steps):
            _, losses = task_losses(model, x, y)
            balancer.backward(losses, model.encoder.parameters())
        balancer.end_epoch()
    before = _saved(target)
    with pytest.raises(ValueError, match="state is for UPGrad"):
        target.load_state_dict(source.state_dict())
    assert _saved(target) == before
    assert target._engine.reuse.calls == 2
    with pytest.raises(ValueError, match="not a saved Balancer state"):
        target.load_state_dict({**target.state_dict(), "_extra_state": {}})
    with pytest.raises(RuntimeError, match="Missing key"):
        target.load_state_dict({k: v for k, v in source.state_dict().items() if k != "gradient._extra_state"})
    assert _saved(target) == before


def _on_path(spec: str, engine: str) -> tuple[tb.Balancer, TinyMTL, torch.Tensor, torch.Tensor]:
    """A balancer for ``spec`` on ``engine`` (skipped where the path cannot serve it), a model, z and L."""
    if engine == "gramian" and tb.make(spec, n_tasks=3).gradient.needs == "jacobian":
        pytest.skip("the Gramian path serves methods that read G only")
    model = TinyMTL()
    z, losses = task_losses(model, *make_data())
    return tb.make(spec, n_tasks=3, engine=engine), model, z, losses


@pytest.mark.parametrize("spec", [*WROTE_NAN, "ew", "ew+mgda", "ew+nashmtl"])
@pytest.mark.parametrize("engine", ["loop", "features", "gramian"])
def test_a_non_finite_gradient_of_a_finite_loss_is_refused(spec: str, engine: str) -> None:
    """1e-30·√u at u = 0: the loss is finite, its gradient NaN; these methods used to write NaN into .grad."""
    balancer, model, z, losses = _on_path(spec, engine)
    kink = 1e-30 * torch.sqrt((z - z.detach()).pow(2).sum())
    losses = torch.stack([losses[0], losses[1] + kink, losses[2]])
    named = r"task\(s\) \[[0-9, ]*1" if balancer.gradient.needs != "nothing" else "non-finite"
    with pytest.raises(ValueError, match=named):
        balancer.backward(losses, model.encoder.parameters(), features=z)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("spec", ["ew+mgda", "ew+nashmtl", "ew+upgrad", "ew+pcgrad", "ew+cagrad", "ew+imtl_g"])
@pytest.mark.parametrize("engine", ["loop", "gramian"])
def test_a_gradient_whose_squared_norm_overflows_is_refused_naming_the_cause(spec: str, engine: str) -> None:
    balancer, model, z, losses = _on_path(spec, engine)
    losses = torch.stack([losses[0], losses[1], losses[2] + 1e20 * (z - z.detach()).sum()])
    with pytest.raises(ValueError, match=r"task\(s\) \[2\] is finite but too large: its squared norm overflows"):
        balancer.backward(losses, model.encoder.parameters(), features=z)
    assert all(p.grad is None for p in model.parameters())


def test_check_finite_false_lets_non_finite_gradients_through() -> None:
    """The documented opt-out: no check, and the sum step is a plain backward() again."""
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("ew+pcgrad", n_tasks=3, check_finite=False)
    z, losses = task_losses(model, x, y)
    losses = torch.stack([losses[0], losses[1] + 1e-30 * torch.sqrt((z - z.detach()).pow(2).sum()), losses[2]])
    balancer.backward(losses, model.encoder.parameters(), features=z)
    assert any(not bool(torch.isfinite(p.grad).all()) for p in model.encoder.parameters() if p.grad is not None)


@pytest.mark.parametrize("check_finite", [True, False])
def test_the_sum_step_is_bit_identical_to_a_plain_backward(check_finite: bool) -> None:
    """Checked (autograd.grad, then added in) or not (backward()), EW's step gives backward()'s exact bits."""
    model = TinyMTL()
    x, y = make_data()
    for _ in range(2):  # the second call accumulates into existing .grad
        torch.autograd.backward(task_losses(model, x, y)[1].sum())
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    balancer = tb.make("ew", n_tasks=3, check_finite=check_finite)
    for _ in range(2):
        _, losses = task_losses(model, x, y)
        balancer.backward(losses, model.encoder.parameters())
    for a, b in zip(_grads(model), expected, strict=True):
        assert torch.equal(a, b)


def test_a_reuse_step_checks_its_update_and_restores_the_call_count() -> None:
    """Between two solves the reused w is applied by one backward: its update is checked before .grad too."""
    model = TinyMTL()
    x, y = make_data()
    balancer = tb.make("ew+mgda", n_tasks=3, update_weights_every=3, max_norm=None)
    z, losses = task_losses(model, x, y)
    balancer.backward(losses, model.encoder.parameters(), features=z)  # the solve
    state, grads = _saved(balancer), _grads(model)
    z, losses = task_losses(model, x, y)
    losses = torch.stack([losses[0] + 1e-30 * torch.sqrt((z - z.detach()).pow(2).sum()), losses[1], losses[2]])
    with pytest.raises(ValueError, match="non-finite"):
        balancer.backward(losses, model.encoder.parameters(), features=z)
    assert balancer._engine.last_path == "reuse"
    assert _saved(balancer) == state
    for a, b in zip(_grads(model), grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", ["igbv1+nashmtl", "dbmtl", "ew+upgrad[update_weights_every=2]", "uw+mgda_ub"])
def test_the_checks_change_no_bit_of_a_good_step(spec: str) -> None:
    """The finiteness check and the transaction only read: three steps give the same .grad and state either way."""
    results = []
    for check_finite in (True, False):
        model = TinyMTL()
        x, y = make_data()
        # the rule's path: "auto" would keep its timings' verdict in the state
        rule = {} if spec_engine(spec) else {"engine": "heuristic"}
        balancer = tb.make(spec, n_tasks=3, check_finite=check_finite, **rule)
        for _ in range(3):
            z, losses = task_losses(model, x, y)
            balancer.backward(losses, model.encoder.parameters(), features=z)
        results.append((_grads(model), [p.grad for p in balancer.parameters()], _saved(balancer)))
    (grads, own, state), (grads_off, own_off, state_off) = results
    assert state == state_off
    for a, b in zip([*grads, *own], [*grads_off, *own_off], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
