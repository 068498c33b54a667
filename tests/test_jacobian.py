"""The engine's exact paths agree: same J or G handed to the method, same .grad of every parameter.

Three models: an MLP, a small CNN with BatchNorm in train mode, and a model whose heads share nothing but where
head 0 also reads a shared parameter directly (features-first is then not exact and must be refused). Two
methods: fixed weights (reads G) and an explicit direction that is not of the form Jᵀw (reads J). float32 and
float64, K = 1 and K = 40. The loop path (K plain autograd calls) is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal, TypedDict, cast

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.gradient_balancing.base import Combination, GradientBalancer
from taskbalance.jacobian import (
    ENGINE_PATHS,
    Engine,
    apply_gradient_method,
    available_memory,
    clip_update,
    resolve_auto,
)


# -- test-local methods ------------------------------------------------------------------------------------------
class FixedWeights(GradientBalancer):
    """Reads G, returns the given weights; records what it was given."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def __init__(self, weights: Tensor, max_norm: float | None = None) -> None:
        super().__init__(max_norm)
        self.weights = weights
        self.seen: Tensor | None = None

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        self.seen = matrix.detach().clone()
        return Combination(weights=self.weights.to(matrix))


class ExplicitDirection(GradientBalancer):
    """Reads J, returns d = Σ_k c_k g_k + 0.1·Σ_k g_k², a direction that no weights give (and sensitive to J)."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__(max_norm)
        self.seen: Tensor | None = None

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        self.seen = matrix.detach().clone()
        c = torch.linspace(0.5, 1.5, matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return Combination(direction=c @ matrix + 0.1 * matrix.pow(2).sum(0))


# -- test-local models: forward(x) -> (features z, K per-task outputs) -------------------------------------------
class MLP(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


class SmallCNN(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x.reshape(x.shape[0], 2, 4, 4))
        return z, [head(z).squeeze(-1) for head in self.heads]


class DirectUse(nn.Module):
    """Disjoint heads on z, but head 0 also reads the first trunk weight directly (a path around z)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(32, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        outputs = [head(z).squeeze(-1) for head in self.heads]
        outputs[0] = outputs[0] + 0.5 * torch.tanh(x @ cast(nn.Linear, self.trunk[0]).weight[0])
        return z, outputs


MODELS: dict[str, Callable[[int], nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "direct": DirectUse}


def setup(name: str, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = MODELS[name](k).to(dtype).train()
    gen = torch.Generator().manual_seed(seed + 1)
    d_in = 5 if name == "mlp" else 32
    x = torch.randn(8, d_in, generator=gen, dtype=dtype)
    y = torch.randn(8, k, generator=gen, dtype=dtype)
    return model, x, y


def balanced_losses(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(z, ℓ̃) with ℓ̃_k = (k+1)/K · MSE_k: unequal task scales, as a loss method would produce."""
    z, outputs = model(x)
    losses = torch.stack([(out - y[:, k]).pow(2).mean() for k, out in enumerate(outputs)])
    scale = torch.arange(1, len(outputs) + 1, dtype=losses.dtype) / len(outputs)
    return z, scale * losses


def shared_and_heads(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    return list(model.trunk.parameters()), list(model.heads.parameters())  # type: ignore[union-attr]


def run(
    model: nn.Module, x: Tensor, y: Tensor, method: GradientBalancer, path: str, engine: Engine | None = None
) -> list[Tensor]:
    """One engine step from zeroed gradients; every parameter's .grad (zeros where None)."""
    model.zero_grad(set_to_none=True)
    z, balanced = balanced_losses(model, x, y)
    shared, heads = shared_and_heads(model)
    apply_gradient_method(balanced, shared, heads, method, z, engine if engine is not None else path)  # type: ignore[arg-type]
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def make_method(
    kind: str, k: int, dtype: torch.dtype, max_norm: float | None = None
) -> FixedWeights | ExplicitDirection:
    """A set-up test-local method; typed as the concrete classes so that ``.seen`` keeps its type."""
    if kind == "weights":
        method: FixedWeights | ExplicitDirection = FixedWeights(torch.linspace(-0.5, 2.0, k, dtype=dtype), max_norm)
    else:
        method = ExplicitDirection(max_norm)
    method.setup(k)
    return method


class Tolerances(TypedDict):
    """Keyword tolerances for ``torch.testing.assert_close`` (a TypedDict, so ``**`` splats type-check)."""

    rtol: float
    atol: float


def tolerances(dtype: torch.dtype) -> Tolerances:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}


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
    paths = ["batched", "auto"] + (["features"] if name != "direct" else [])
    paths += ["gramian"] if kind == "weights" else []
    for path in paths:
        method.seen = None
        engine = Engine(path)  # type: ignore[arg-type]
        grads = run(model, x, y, method, path, engine)
        assert engine.last_path == ("loop" if name == "direct" else "features") or path != "auto"  # CPU
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
            apply_gradient_method(balanced, shared, heads, method, z, path)  # type: ignore[arg-type]
    assert all(p.grad is None for p in model.parameters())


def test_gradients_accumulate_into_existing_grad() -> None:
    model, x, y = setup("mlp", 3, torch.float64)
    method = make_method("direction", 3, torch.float64)
    step = run(model, x, y, method, "loop")
    for path in ("loop", "batched", "features", "representation"):
        previous = [torch.full_like(p, 0.25) for p in model.parameters()]
        for p, g in zip(model.parameters(), previous, strict=True):
            p.grad = g.clone()
        z, balanced = balanced_losses(model, x, y)
        shared, heads = shared_and_heads(model)
        apply_gradient_method(balanced, shared, heads, method, z, path)  # type: ignore[arg-type]
        if path == "representation":  # a different shared update, same head update
            for head, g, s in zip(heads, previous[len(shared) :], step[len(shared) :], strict=True):
                torch.testing.assert_close(head.grad, g + s)
            continue
        for p, g, s in zip(model.parameters(), previous, step, strict=True):
            torch.testing.assert_close(p.grad, g + s)
    weights = make_method("weights", 3, torch.float64)
    step = run(model, x, y, weights, "loop")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    z, balanced = balanced_losses(model, x, y)
    apply_gradient_method(balanced, *shared_and_heads(model), weights, z, "gramian")
    for p, s in zip(model.parameters(), step, strict=True):
        torch.testing.assert_close(p.grad, 1 + s)


@pytest.mark.parametrize(
    ("path", "kind"),
    [(p, "weights") for p in ("loop", "batched", "features", "gramian", "representation")]
    + [(p, "direction") for p in ("loop", "batched", "features", "representation")],
)
def test_clipping_bounds_the_shared_update_only(path: str, kind: str) -> None:
    model, x, y = setup("mlp", 4, torch.float64)
    free = run(model, x, y, make_method(kind, 4, torch.float64), path)
    clipped = run(model, x, y, make_method(kind, 4, torch.float64, max_norm=1e-3), path)
    loose = run(model, x, y, make_method(kind, 4, torch.float64, max_norm=1e6), path)
    n_shared = len(shared_and_heads(model)[0])
    free_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in free[:n_shared]]))
    clipped_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped[:n_shared]]))
    assert free_norm > 1e-2
    torch.testing.assert_close(clipped_norm, torch.tensor(1e-3, dtype=torch.float64))
    for a, b in zip(clipped[:n_shared], free[:n_shared], strict=True):  # same direction
        torch.testing.assert_close(a, b * (1e-3 / free_norm))
    for a, b in zip(clipped[n_shared:], free[n_shared:], strict=True):  # heads untouched
        torch.testing.assert_close(a, b)
    for a, b in zip(loose, free, strict=True):
        torch.testing.assert_close(a, b)


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
    import taskbalance.jacobian as engine_module

    monkeypatch.setattr(engine_module, "available_memory", lambda device: 1000)  # bytes: J of TinyMTL is larger
    monkeypatch.setattr(engine_module, "resolve_auto", _resolve_without_floor(engine_module.resolve_auto))
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


def test_clip_update() -> None:
    update = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(clip_update(update, 1.0), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(clip_update(update, 10.0), update)
    assert clip_update(update, None) is update


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
    apply_gradient_method(losses, [model.trunk.weight], list(model.heads.parameters()), method, z, "representation")

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
        apply_gradient_method(scale * balanced, shared, heads, method, z, path)  # type: ignore[arg-type]
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
    apply_gradient_method(balanced[order], *shared_and_heads(model), permuted, z, "features")
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
    with pytest.raises(ValueError, match="unknown engine path 'fast'; choose from auto, loop"):
        Engine("fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="engine 'gramian' needs a method that reads only G"):
        apply_gradient_method(balanced, shared, heads, direction, z, "gramian")
    for path in ("features", "representation"):
        with pytest.raises(ValueError, match="no features were given"):
            apply_gradient_method(balanced, shared, heads, weights, None, path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not the output of a differentiable computation"):
        apply_gradient_method(balanced, shared, heads, weights, z.detach(), "features")
    assert all(p.grad is None for p in model.parameters())


class BadWeights(GradientBalancer):
    needs: ClassVar[Literal["gramian", "jacobian"]] = "gramian"

    def __init__(self, result: Combination) -> None:
        super().__init__()
        self.result = result

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        return self.result


@pytest.mark.parametrize("path", ["batched", "gramian"])
def test_malformed_combinations_are_reported(path: str) -> None:
    model, x, y = setup("mlp", 3, torch.float64)
    for result, message in [
        (Combination(weights=torch.ones(2, dtype=torch.float64)), r"weights of shape \(2,\), expected \(3,\)"),
        (Combination(direction=torch.ones(5, dtype=torch.float64)), "reads only G .* returned no weights"),
    ]:
        method = BadWeights(result)
        method.setup(3)
        z, balanced = balanced_losses(model, x, y)
        with pytest.raises(ValueError, match=message):
            apply_gradient_method(balanced, *shared_and_heads(model), method, z, path)  # type: ignore[arg-type]
    explicit = ExplicitDirection()
    explicit.setup(3)
    explicit.combine = lambda matrix, losses: Combination(direction=torch.ones(5, dtype=torch.float64))  # type: ignore[method-assign]
    z, balanced = balanced_losses(model, x, y)
    with pytest.raises(ValueError, match=r"direction of shape \(5,\), expected \(\d+,\)"):
        apply_gradient_method(balanced, *shared_and_heads(model), explicit, z, "batched")


@pytest.mark.parametrize("path", ["batched", "features", "gramian"])
def test_a_path_is_bitwise_repeatable(path: str) -> None:
    model, x, y = setup("cnn", 5, torch.float32)
    first = run(model, x, y, make_method("weights", 5, torch.float32), path)
    second = run(model, x, y, make_method("weights", 5, torch.float32), path)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


class StatefulDirection(GradientBalancer):
    """Returns its own buffer as the direction (as EMA-based methods may)."""

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        self.state = matrix.sum(0)
        return Combination(direction=self.state)


class TwinBias(nn.Module):
    """Head outputs + c1 + c2 with c1, c2 of the output's shape: autograd hands both the same gradient tensor."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k))
        self.c1 = nn.Parameter(torch.zeros(8))
        self.c2 = nn.Parameter(torch.zeros(8))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) + self.c1 + self.c2 for head in self.heads]


@pytest.mark.parametrize("path", ["loop", "batched", "features", "gramian", "representation"])
def test_new_grads_share_memory_with_nothing(path: str) -> None:
    """In-place work on one .grad (clipping, zero_grad(set_to_none=False)) must not reach another or a method."""
    torch.manual_seed(0)
    model = TwinBias(2).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    z, balanced = balanced_losses(model, x, y)
    method = StatefulDirection() if path != "gramian" else make_method("weights", 2, torch.float64)
    method.setup(2)
    others = [*model.heads.parameters(), model.c1, model.c2]
    apply_gradient_method(balanced, list(model.trunk.parameters()), others, method, z, path)  # type: ignore[arg-type]
    pointers = [p.grad.untyped_storage().data_ptr() for p in model.parameters()]  # type: ignore[union-attr]
    assert len(set(pointers)) == len(pointers)
    if isinstance(method, StatefulDirection) and path != "representation":
        state = method.state.clone()
        for p in model.trunk.parameters():
            p.grad.zero_()  # type: ignore[union-attr]
        torch.testing.assert_close(method.state, state)


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
