"""The balancer inside ordinary training loops: bf16 autocast, GradScaler, exact gradient accumulation (issue 11).

Every registered method and three compositions; the reference is always the plain float32 call on the whole batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch._functorch.config as functorch_config
from torch import Tensor

import taskbalance as tb
from tests.distributed.workers import flat_state, losses_of
from tests.models import TinyMTL

SPECS = [*tb.available(), "igbv1+nashmtl", "igbv2+cagrad", "igbv1+imgrad"]
BATCH = 16


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged solvers on this tiny problem are not the subject here
        yield


def _data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 3, generator=gen)


def _setup(spec: str, **options: object) -> tuple[TinyMTL, tb.Balancer]:
    torch.manual_seed(5)  # methods seeded from the global RNG draw the same seed in every setup
    return TinyMTL(n_tasks=3, seed=0), tb.make(spec, n_tasks=3, **options)


def _grads(model: TinyMTL) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _plain(spec: str, **options: object) -> tuple[Tensor, tb.Balancer]:
    model, balancer = _setup(spec, **options)
    x, y = _data()
    features, losses = losses_of(model, x, y)
    balancer.backward(losses, model.encoder.parameters(), features=features)
    return _grads(model), balancer


#: GradDrop keeps coordinate i of g_k when a uniform draw falls below P_i = ½(1 + Σ_k g_ki / Σ_k |g_ki|): a step
#: function of the gradients. bf16's 8-bit mantissa moves P_i by ~1e-2, flipping the draws that fall that close
#: to it (about 1% of the coordinates), each a whole gradient coordinate: its cosine is ~0.998, not the others' 0.9999
COSINE = {"graddrop": 0.99}


@pytest.mark.parametrize("spec", SPECS)
def test_bf16_autocast_update_is_the_float32_update(spec: str) -> None:
    reference, _ = _plain(spec)
    model, balancer = _setup(spec)
    x, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, losses = losses_of(model, x, y)
    assert features.dtype == torch.bfloat16
    balancer.backward(losses, model.encoder.parameters(), features=features)
    assert all(p.grad.dtype == p.dtype for p in model.parameters() if p.grad is not None)
    update = _grads(model)
    assert float(torch.nn.functional.cosine_similarity(update, reference, dim=0)) >= COSINE.get(spec, 0.999)


@pytest.mark.parametrize("spec", SPECS)
def test_grad_scaler_update_after_unscale_is_the_unscaled_update(spec: str) -> None:
    reference, _ = _plain(spec)
    model, balancer = _setup(spec)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = _data()
    features, losses = losses_of(model, x, y)
    result = balancer.backward(losses, model.encoder.parameters(), features=features, scaler=scaler)
    assert not result.skipped
    scaled = _grads(model)
    assert _relative(scaled, reference * 2.0**16) <= 1e-5  # .grad carries the scale, as scaler.step expects
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(optimizer)
    assert _relative(_grads(model), reference) <= 1e-5


def _overflowing(losses: Tensor, features: Tensor) -> Tensor:
    """The same loss values, with a NaN gradient: 0 · √(z − z) has value 0 and derivative 0 · ∞."""
    spike = torch.sqrt(features.sum() - features.sum().detach())
    return losses + 0.0 * spike


@pytest.mark.parametrize("spec", SPECS)
def test_grad_scaler_skips_an_overflowing_step_and_no_state_advances(spec: str) -> None:
    model, balancer = _setup(spec)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = _data()
    for _ in range(2):  # a normal step first: methods with history hold some
        optimizer.zero_grad()
        features, losses = losses_of(model, x, y)
        balancer.backward(losses, model.encoder.parameters(), features=features, scaler=scaler)
        scaler.step(optimizer)
        scaler.update()
    state = flat_state(balancer.state_dict(), "")
    params = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    optimizer.zero_grad()
    features, losses = losses_of(model, x, y)
    result = balancer.backward(
        _overflowing(losses, features), model.encoder.parameters(), features=features, scaler=scaler
    )
    assert result.skipped and not result.converged
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale / 2  # backed off
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))  # the step was skipped
    after = flat_state(balancer.state_dict(), "")
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state), [
        k for k in state if not torch.equal(after[k], state[k])
    ]


def test_grad_scaler_skips_a_non_finite_loss() -> None:
    model, balancer = _setup("igbv1+nashmtl")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = _data()
    _features, losses = losses_of(model, x, y)
    result = balancer.backward(
        losses * torch.tensor([1.0, float("inf"), 1.0]), model.encoder.parameters(), scaler=scaler
    )
    assert result.skipped and torch.isnan(result.weights).all()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(optimizer)
    assert sum(v.item() for v in scaler._check_inf_per_device(optimizer).values()) > 0


def _accumulated(spec: str, micro_batches: int, steps: int = 1, **options: object) -> tuple[Tensor, tb.Balancer]:
    model, balancer = _setup(spec, **options)
    x, y = _data()
    size = BATCH // micro_batches
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        for i in range(micro_batches):
            part = slice(i * size, (i + 1) * size)
            features, losses = losses_of(model, x[part], y[part])
            result = balancer.backward(
                losses, model.encoder.parameters(), features=features, accumulate=i < micro_batches - 1
            )
            assert (result is None) == (i < micro_batches - 1)
    return _grads(model), balancer


@pytest.mark.parametrize("spec", SPECS)
def test_four_accumulated_micro_batches_are_one_call_on_the_whole_batch(spec: str) -> None:
    reference, one_call = _plain(spec)
    update, accumulated = _accumulated(spec, 4)
    assert _relative(update, reference) <= 1e-5
    expected, state = flat_state(one_call.state_dict(), ""), flat_state(accumulated.state_dict(), "")
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key].double(), value.double(), rtol=1e-5, atol=1e-7, msg=key)


def test_update_weights_every_counts_optimizer_steps_under_accumulation() -> None:
    _, balancer = _accumulated("nashmtl", 4, steps=3, update_weights_every=2)
    assert balancer.state_dict()["_extra_state"]["calls"] == 3


def test_a_micro_batch_of_other_parameters_is_refused_and_reset_drops_the_pending_ones() -> None:
    model, balancer = _setup("mgda")
    x, y = _data()
    _, losses = losses_of(model, x, y)
    balancer.backward(losses, model.encoder.parameters(), accumulate=True)
    _, losses = losses_of(model, x, y)
    with pytest.raises(ValueError, match="other parameters"):
        balancer.backward(losses, list(model.encoder.parameters())[:2], accumulate=True)
    balancer.reset_accumulation()
    assert all(p.grad is None for p in model.parameters())
    assert balancer.backward(losses, list(model.encoder.parameters())[:2]) is not None


@pytest.fixture
def _undonated() -> Iterator[None]:
    """What the README says to set before compiling: the K per-task products run the compiled backward K times."""
    with functorch_config.patch(donated_buffer=False):
        yield


def _compiled_run(compile_what: str) -> tuple[Tensor, str, list[warnings.WarningMessage]]:
    torch.manual_seed(5)
    model = TinyMTL(n_tasks=3, seed=0)
    balancer = tb.make("mgda", n_tasks=3)
    net: torch.nn.Module = model
    if compile_what == "model":
        net = torch.compile(model, backend="aot_eager")  # type: ignore[assignment]
    elif compile_what == "encoder":
        encoder = model.encoder
        model.encoder = torch.compile(encoder, backend="aot_eager")  # type: ignore[assignment]
    x, y = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for p in model.parameters():
                p.grad = None
            features, losses = losses_of(net, x, y)
            balancer.backward(
                losses, getattr(model.encoder, "_orig_mod", model.encoder).parameters(), features=features
            )
    return (
        _grads(model),
        balancer._engine.last_path,
        [w for w in caught if issubclass(w.category, tb.engine.CompiledModelWarning)],
    )


@pytest.mark.usefixtures("_undonated")
def test_a_compiled_encoder_keeps_the_features_path_and_the_eager_gradients() -> None:
    eager, path, warned = _compiled_run("none")
    compiled, compiled_path, compiled_warned = _compiled_run("encoder")
    assert path == compiled_path == "features_loop" and not warned and not compiled_warned  # the rule (trial steps)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("_undonated")
def test_a_model_compiled_whole_is_exact_on_the_loop_path_and_says_why_once() -> None:
    eager, _, _ = _compiled_run("none")
    compiled, path, warned = _compiled_run("model")
    assert path == "loop"
    assert len(warned) == 1 and "Compile the encoder alone" in str(warned[0].message)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", ["igbv1+nashmtl", "dbmtl", "uw", "mgda_ub"])
def test_accumulation_under_a_scaler_is_the_plain_update_and_an_overflowing_micro_batch_skips_the_step(
    spec: str,
) -> None:
    reference, _ = _plain(spec)
    model, balancer = _setup(spec)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.1)
    x, y = _data()

    def step(overflow_at: int | None) -> tb.BalanceResult | None:
        result = None
        for i in range(4):
            part = slice(4 * i, 4 * i + 4)
            features, losses = losses_of(model, x[part], y[part])
            if i == overflow_at:
                losses = _overflowing(losses, features)
            result = balancer.backward(
                losses, model.encoder.parameters(), features=features, scaler=scaler, accumulate=i < 3
            )
        return result

    step(None)
    optimizer_view = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(optimizer_view)
    assert _relative(_grads(model), reference) <= 1e-5
    scaler.update()
    optimizer.zero_grad()
    state = flat_state(balancer.state_dict(), "")
    result = step(overflow_at=1)
    assert result is not None and result.skipped
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    after = flat_state(balancer.state_dict(), "")
    assert all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("spec", ["nashmtl", "igbv1+upgrad", "dbmtl", "ew"])
def test_backward_called_inside_the_autocast_region_is_the_backward_called_after_it(spec: str) -> None:
    outside, inside = [], []
    for results, within in ((outside, False), (inside, True)):
        model, balancer = _setup(spec)
        x, y = _data()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features, losses = losses_of(model, x, y)
            if within:
                results.append(balancer.backward(losses, model.encoder.parameters(), features=features).weights)
        if not within:
            results.append(balancer.backward(losses, model.encoder.parameters(), features=features).weights)
        results.append(_grads(model))
    assert all(torch.equal(a, b) for a, b in zip(outside, inside, strict=True))


@functorch_config.patch(donated_buffer=True)
def test_a_compiled_backward_with_donated_buffers_is_one_clear_error() -> None:
    torch._dynamo.reset()
    # a second compile of nn.Sequential.forward (dynamic shapes then) donates its buffers: what users meet
    warm = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()), backend="aot_eager")
    warm(torch.randn(2, 8)).sum().backward()
    model, balancer = _setup("mgda")
    model.encoder = torch.compile(model.encoder, backend="aot_eager")  # type: ignore[assignment]
    x, y = _data()
    features, losses = losses_of(model, x, y)
    state = flat_state(balancer.state_dict(), "")
    with pytest.raises(RuntimeError, match=r"torch\._functorch\.config\.donated_buffer = False"):
        balancer.backward(losses, model.encoder._orig_mod.parameters(), features=features)
    after = flat_state(balancer.state_dict(), "")
    assert all(torch.equal(after[k], state[k]) for k in state)
    torch._dynamo.reset()
