"""The engine's exact paths agree: same J or G handed to the method, same .grad of every parameter.

The models and methods are those of :mod:`tests.engine.helpers`, in float32 and float64, K = 1 and K = 40. The
loop path (K plain autograd calls) is the reference.
"""

from __future__ import annotations

from typing import ClassVar, Literal, cast

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.engine import ENGINE_PATHS, Engine
from taskbalance.gradient_balancing.base import Combination, GradientBalancer
from tests.engine.helpers import (
    MODELS,
    FixedWeights,
    balanced_losses,
    make_method,
    run,
    setup,
    shared_and_heads,
    tolerances,
)


# -- the equivalence matrix -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["weights", "direction"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exact_paths_agree(name: str, kind: str, dtype: torch.dtype, k: int) -> None:
    model, x, y = setup(name, k, dtype)
    method = make_method(kind, k, dtype)
    expected = run(model, x, y, method, "loop")
    expected_matrix = method.seen
    assert expected_matrix is not None
    assert expected_matrix.shape[0] == k
    assert any(bool(g.abs().sum() > 0) for g in expected)
    paths = ["batched", "auto", "heuristic"] + (["features", "features_loop"] if name != "direct" else [])
    paths += ["gramian"] if kind == "weights" else []
    for path in paths:
        method.seen = None
        engine = Engine(path)  # type: ignore[arg-type]
        grads = run(model, x, y, method, path, engine)
        # the rule on the CPU; the first step of "auto" is a trial step, whose gradients are the rule's
        rule = "loop" if name == "direct" else "features_loop"
        assert engine.last_path == rule or path not in ("auto", "heuristic")
        assert not engine.fell_back
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, **tolerances(dtype), msg=f"{path}: gradient differs")
        assert method.seen is not None
        torch.testing.assert_close(method.seen, expected_matrix, **tolerances(dtype), msg=f"{path}: J or G differs")


def test_features_first_is_refused_when_a_shared_parameter_bypasses_features() -> None:
    model, x, y = setup("direct", 3, torch.float64)
    z, balanced = balanced_losses(model, x, y)
    shared, heads = shared_and_heads(model)
    method = make_method("weights", 3, torch.float64)
    for path in ("features", "representation"):
        with pytest.raises(ValueError, match=r"positions \[0\] reach the losses without passing through features"):
            Engine(path)(balanced, shared, heads, method, z)  # type: ignore[arg-type]
    assert all(p.grad is None for p in model.parameters())


# -- representation path: MGDA-UB against a closed form -----------------------------------------------------------
class Bilinear(nn.Module):
    """z = X Wᵀ, head k: z a_k; no biases, so every gradient has a closed form."""

    def __init__(self, k: int, d_in: int = 4, d: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Linear(d_in, d, bias=False)
        self.heads = nn.ModuleList(nn.Linear(d, 1, bias=False) for _ in range(k))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


def test_representation_path_equals_hand_computation() -> None:
    k, b = 3, 6
    torch.manual_seed(3)
    model = Bilinear(k).double()
    x = torch.randn(b, 4, dtype=torch.float64)
    y = torch.randn(b, k, dtype=torch.float64)
    w = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    method = FixedWeights(w)
    method.setup(k)
    z, outputs = model(x)
    losses = torch.stack([(out - y[:, j]).pow(2).mean() for j, out in enumerate(outputs)])
    Engine("representation")(losses, [model.trunk.weight], list(model.heads.parameters()), method, z)

    with torch.no_grad():
        weight = model.trunk.weight  # (d, d_in)
        a = torch.stack([cast(nn.Linear, h).weight[0] for h in model.heads])  # (K, d)
        zz = x @ weight.T
        r = zz @ a.T - y  # residuals (B, K)
        jz = torch.stack([(2 / b) * r[:, j, None] * a[j] for j in range(k)])  # ∂L_k/∂z (K, B, d)
        flat = jz.reshape(k, -1)
        expected_gz = flat @ flat.T  # = (4/B²)(r_k·r_j)(a_k·a_j)
        torch.testing.assert_close(expected_gz, (4 / b**2) * (r.T @ r) * (a @ a.T))
        expected_trunk = torch.einsum("k,kbd,bi->di", w, jz, x)  # Σ_k w_k (∂L_k/∂z)ᵀ X
        expected_heads = [(2 / b) * (zz.T @ r[:, j]) for j in range(k)]
    assert method.seen is not None
    torch.testing.assert_close(method.seen, expected_gz)
    torch.testing.assert_close(model.trunk.weight.grad, expected_trunk)
    for head, want in zip(model.heads, expected_heads, strict=True):
        grad = cast(nn.Linear, head).weight.grad
        assert grad is not None
        torch.testing.assert_close(grad[0], want)


def test_representation_direction_is_in_feature_space() -> None:
    model, x, y = setup("mlp", 3, torch.float64)
    method = make_method("direction", 3, torch.float64)
    run(model, x, y, method, "representation")
    assert method.seen is not None
    assert method.seen.shape == (3, 8 * 8)  # J_z: K × (batch · width)
    z, balanced = balanced_losses(model, x, y)
    shared, _ = shared_and_heads(model)
    jz = torch.stack([torch.autograd.grad(balanced[j], z, retain_graph=True)[0].flatten() for j in range(3)])
    direction = torch.linspace(0.5, 1.5, 3, dtype=torch.float64) @ jz + 0.1 * jz.pow(2).sum(0)
    expected = torch.autograd.grad(z, shared, direction.reshape(z.shape))
    for p, want in zip(shared, expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, want)


# -- numeric properties ---------------------------------------------------------------------------------------------
@given(
    weights=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
)
def test_update_is_jt_w_on_every_path(weights: list[float], seed: int, scale: float) -> None:
    """Every path's shared update is Jᵀw of the loop's J; scaling ℓ̃ by c scales every gradient by c."""
    k = len(weights)
    model, x, y = setup("mlp", k, torch.float64, seed=seed % 97)
    w = torch.tensor(weights, dtype=torch.float64)
    method = FixedWeights(w)
    method.setup(k)
    model.zero_grad(set_to_none=True)
    z, balanced = balanced_losses(model, x, y)
    shared, heads = shared_and_heads(model)
    rows = [torch.autograd.grad(balanced[j], shared, retain_graph=True) for j in range(k)]
    jacobian = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
    expected = scale * (w @ jacobian)
    for path in ("batched", "features", "gramian", "representation"):
        model.zero_grad(set_to_none=True)
        z, balanced = balanced_losses(model, x, y)
        Engine(path)(scale * balanced, shared, heads, method, z)  # type: ignore[arg-type]
        got = torch.cat([p.grad.flatten() for p in shared])  # type: ignore[union-attr]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * scale)
        if path != "representation":  # there the method reads G_z
            torch.testing.assert_close(method.seen, (scale**2) * (jacobian @ jacobian.T))


@given(permutation=st.permutations(list(range(4))))
def test_task_permutation_permutes_j_and_leaves_the_update(permutation: list[int]) -> None:
    model, x, y = setup("mlp", 4, torch.float64)
    w = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    order = torch.tensor(permutation)
    method = FixedWeights(w)
    method.setup(4)
    reference = run(model, x, y, method, "features")
    gramian = method.seen
    assert gramian is not None
    permuted = FixedWeights(w[order])
    permuted.setup(4)
    model.zero_grad(set_to_none=True)
    z, balanced = balanced_losses(model, x, y)
    Engine("features")(balanced[order], *shared_and_heads(model), permuted, z)
    torch.testing.assert_close(permuted.seen, gramian[order][:, order])
    for p, want in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, want)


# -- the Balancer seam, errors, determinism -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ENGINE_PATHS)
def test_balancer_runs_every_path(path: str) -> None:
    model, x, y = setup("mlp", 3, torch.float64)
    method = make_method("weights", 3, torch.float64)
    expected = run(model, x, y, method, "loop")
    model.zero_grad(set_to_none=True)
    balancer = tb.Balancer(gradient=make_method("weights", 3, torch.float64), n_tasks=3, engine=path)  # type: ignore[arg-type]
    z, outputs = model(x)
    losses = torch.stack([(out - y[:, k]).pow(2).mean() for k, out in enumerate(outputs)])
    balancer.backward(losses * torch.arange(1, 4, dtype=losses.dtype) / 3, shared_and_heads(model)[0], features=z)
    for p, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want)


def test_bad_requests_raise_before_touching_gradients() -> None:
    model, x, y = setup("mlp", 3, torch.float64)
    shared, heads = shared_and_heads(model)
    weights = make_method("weights", 3, torch.float64)
    direction = make_method("direction", 3, torch.float64)
    z, balanced = balanced_losses(model, x, y)
    with pytest.raises(ValueError, match="unknown engine path 'fast'; choose from auto, heuristic, loop"):
        Engine("fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="engine 'gramian' needs a method that reads only G"):
        Engine("gramian")(balanced, shared, heads, direction, z)
    for path in ("features", "representation"):
        with pytest.raises(ValueError, match="no features were given"):
            Engine(path)(balanced, shared, heads, weights, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not the output of a differentiable computation"):
        Engine("features")(balanced, shared, heads, weights, z.detach())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("path", ["batched", "features", "gramian"])
def test_a_path_is_bitwise_repeatable(path: str) -> None:
    model, x, y = setup("cnn", 5, torch.float32)
    first = run(model, x, y, make_method("weights", 5, torch.float32), path)
    second = run(model, x, y, make_method("weights", 5, torch.float32), path)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


class RecordingJacobian(GradientBalancer):
    """Keeps a copy of every J it is given, and where J lived."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []
        self.addresses: list[int] = []

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        self.seen.append(matrix.clone())
        self.addresses.append(matrix.data_ptr())
        return Combination(weights=torch.ones(self.n_tasks, dtype=matrix.dtype))


@pytest.mark.parametrize("with_features", [False, True])
def test_reused_buffers_give_each_step_its_own_jacobian(with_features: bool) -> None:
    # the loop's outputs and J are reused from step to step (no fresh pages); each step must still see exactly
    # what a fresh engine computes, and gradients handed to .grad earlier must not change later
    import copy

    from tests.models import TinyMTL, make_data, task_losses

    model = TinyMTL()
    engine, recorder = Engine("loop" if not with_features else "auto"), RecordingJacobian()
    recorder.setup(3)
    kept: list[tuple[list[Tensor], list[Tensor]]] = []
    for seed in range(3):
        x, y = make_data(seed=seed)
        twin, fresh = copy.deepcopy(model), RecordingJacobian()
        fresh.setup(3)
        _, twin_losses = task_losses(twin, x, y)
        Engine("loop")(twin_losses, list(twin.encoder.parameters()), [], fresh)
        model.zero_grad(set_to_none=True)
        z, losses = task_losses(model, x, y)
        shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
        engine(losses, shared, heads, recorder, z if with_features else None)
        torch.testing.assert_close(recorder.seen[-1], fresh.seen[0])
        grads = [cast(Tensor, p.grad) for p in shared]
        kept.append((grads, [g.clone() for g in grads]))
    assert len(set(recorder.addresses)) == 1  # one buffer for every step
    for grads, snapshot in kept:
        for g, s in zip(grads, snapshot, strict=True):
            assert torch.equal(g, s)
