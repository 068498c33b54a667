"""The engine: how the per-task gradients of the shared parameters are obtained and the update applied.

Given the balanced losses ℓ̃ (K,), the shared parameters θ and the task-specific parameters (heads, and loss
methods' own parameters such as UW's log-variances), the engine computes what the gradient method reads — the
Jacobian J (K × P, row k = ∇_θ ℓ̃_k) or the Gramian G = J Jᵀ — lets the method combine, and accumulates

- into ``θ.grad``: the method's update (Jᵀ w, or its explicit flat direction), clipped to ``method.max_norm``;
- into every other leaf's ``.grad``: ∇ Σ_k ℓ̃_k (each head gets the gradient of its own balanced loss).

Gradients accumulate like an ordinary ``backward()`` (gradient accumulation across micro-batches works), and no
gradient leaves the device. Paths (``Balancer(engine=...)``):

``"loop"``            K backward calls. The reference; works on every graph. Cost K backward passes.
``"batched"``         one backward under vmap with the K one-hot cotangents (``is_grads_batched``); K calls when
                      vmap cannot run the graph (warned once, remembered). Cost ≈ one K-batched backward, and each
                      head is run K times (the one-hot of task k still sends zeros through the other heads).
``"features"``        features-first, exact: J_z = ∂ℓ̃/∂z through the heads, then one K-batched product
                      J = J_z · ∂z/∂θ through the trunk. When the graph separates the tasks the heads run once
                      (an EW backward through them) instead of K times (:mod:`taskbalance._engine_heads`).
                      Needs ``features`` and every path from θ to ℓ̃ running through it.
``"gramian"``         for methods that read only G (``needs == "gramian"``): G accumulated parameter by parameter
                      during the backward, never holding J (:func:`~taskbalance._engine_vjp.streaming_gramian`),
                      then the update by one backward of Σ_k w_k ℓ̃_k restricted to θ. One more backward than the
                      other paths: it trades time for memory (K × P floats). Uses the features-first split when it
                      is exact, so the update backward then runs through the trunk only.
``"representation"``  MGDA-UB (Sener & Koltun, NeurIPS 2018, arXiv 1810.04650): an approximation, only on request.
                      The method reads J_z (or G_z = J_z J_zᵀ) instead of J; the update of θ is the trunk product of
                      the combined feature gradient Σ_k w_k ∂ℓ̃_k/∂z, or of the method's direction read as a
                      direction in feature space (flattened z). Cost ≈ one backward, plus J_z and G_z.
``"auto"``            (default) the cheapest exact path that is safe: ``"features"`` when ``features`` is given and
                      every path from θ to ℓ̃ goes through it (checked on the autograd graph), else ``"batched"``.
                      On the CPU the K products go one task at a time rather than through vmap, which is slower
                      there (:func:`resolve_auto`); the heads are still run once. For a method that reads only G,
                      ``"gramian"`` when J (K × P) would take more than half the memory available on the device.

Clipping: the shared update u is scaled by min(1, max_norm / ‖u‖). On the Gramian path ‖Jᵀw‖ = √(wᵀGw), so w
is scaled before the update backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._engine_heads import features_jacobian
from ._engine_vjp import BlockBuffers, EngineFallbackWarning, VmapMemo, batched_vjp, streaming_gramian
from ._graph import leaves_before, task_split
from .gradient_balancing.base import Combination, GradientBalancer

__all__ = [
    "ENGINE_PATHS",
    "Engine",
    "EngineFallbackWarning",
    "EnginePath",
    "apply_gradient_method",
    "available_memory",
    "clip_update",
    "resolve_auto",
]

EnginePath = Literal["auto", "loop", "batched", "features", "gramian", "representation"]
ENGINE_PATHS: tuple[str, ...] = ("auto", "loop", "batched", "features", "gramian", "representation")


def clip_update(update: Tensor, max_norm: float | None) -> Tensor:
    """Scale ``update`` so that its norm is at most ``max_norm`` (unchanged when None)."""
    if max_norm is None:
        return update
    return update * _clip_factor(torch.linalg.vector_norm(update), max_norm)


def _clip_factor(norm: Tensor, max_norm: float) -> Tensor:
    return torch.clamp(max_norm / (norm + 1e-12), max=1.0)


def _clip_blocks(blocks: Sequence[Tensor | None], max_norm: float) -> list[Tensor | None]:
    """The blocks of one update, scaled together so that their joint norm is at most ``max_norm``."""
    norms = [torch.linalg.vector_norm(g) for g in blocks if g is not None]
    factor = _clip_factor(torch.linalg.vector_norm(torch.stack(norms)), max_norm)
    return [None if g is None else g * factor for g in blocks]


class _FeatureCut:
    """θ, the other leaves, and how they sit around ``features`` z (which leaves ℓ̃ reaches without z)."""

    def __init__(
        self, balanced: Tensor, features: Tensor | None, shared: Sequence[Tensor], task_params: Sequence[Tensor]
    ) -> None:
        self.head_side: list[Tensor] = []
        self.trunk_side: list[Tensor] = []
        self.reason = ""
        if features is None:
            self.reason = "no features were given"
            return
        if features.grad_fn is None:
            self.reason = "features are not the output of a differentiable computation (no grad_fn)"
            return
        direct = {id(t) for t in leaves_before(balanced, features)}
        bypass = [i for i, p in enumerate(shared) if id(p) in direct]
        if bypass:
            self.reason = f"shared parameters at positions {bypass} reach the losses without passing through features"
            return
        self.head_side = [p for p in task_params if id(p) in direct]
        self.trunk_side = [p for p in task_params if id(p) not in direct]

    @property
    def exact(self) -> bool:
        """Whether J = J_z · ∂z/∂θ holds (every path from θ to ℓ̃ goes through z)."""
        return not self.reason


class Engine:
    """Obtains per-task gradients along one of :data:`ENGINE_PATHS` and applies a gradient method's update.

    Keep one ``Engine`` per training run: it remembers whether vmap can run the model's backward graph, so a
    failing batched attempt is paid (and warned about) once, and once vmap is known to work the last backward of
    each step frees the graph like an ordinary ``backward()``. ``last_path`` names the path the last call took
    (``"auto"`` resolved), and :attr:`fell_back` says whether vmap failed, for logs and tests.
    """

    def __init__(self, path: EnginePath = "auto") -> None:
        if path not in ENGINE_PATHS:
            raise ValueError(f"unknown engine path {path!r}; choose from {', '.join(ENGINE_PATHS)}")
        self.path: EnginePath = path
        self.memo = VmapMemo()
        self.buffers = BlockBuffers()
        self.last_path = ""

    @property
    def fell_back(self) -> bool:
        """Whether vmap failed on this model, so that products are taken one task at a time."""
        return bool(self.memo.failed)

    def reset(self) -> None:
        """Forget what was learnt about vmap on the model, and free the reused buffers."""
        self.memo = VmapMemo()
        self.buffers.clear()
        self.last_path = ""

    def __repr__(self) -> str:
        return f"Engine({self.path!r})"

    def __call__(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        method: GradientBalancer,
        features: Tensor | None = None,
    ) -> Combination:
        """Compute what ``method`` needs, combine, and accumulate the gradients. Returns the method's Combination."""
        path = self.path
        if path == "gramian" and method.needs != "gramian":
            raise ValueError(f"engine 'gramian' needs a method that reads only G; {type(method).__name__} reads J")
        cut_needed = path in ("auto", "features", "gramian", "representation")
        split = _FeatureCut(balanced, features if cut_needed else None, shared, task_params)
        if path in ("features", "representation") and not split.exact:
            raise ValueError(f"engine {path!r} needs features through which every shared path runs: {split.reason}")
        trunk_vmap = True
        if path == "auto":
            reads_gramian = method.needs == "gramian"
            size = balanced.shape[0] * sum(p.numel() * p.element_size() for p in shared) if reads_gramian else 0
            path, trunk_vmap = resolve_auto(split.exact, balanced.device, size, reads_gramian)
        if path == "representation":
            assert features is not None
            return self._representation(balanced, shared, features, split, method)
        if path == "gramian":
            return self._gramian(balanced, shared, task_params, features, split, method)
        if path == "features":
            assert features is not None
            blocks, task_grads = self._features(balanced, shared, features, split, trunk_vmap)
            task_params = [*split.head_side, *split.trunk_side]
        else:
            eye = torch.eye(balanced.shape[0], dtype=balanced.dtype, device=balanced.device)
            inputs = [*shared, *task_params]
            grads = batched_vjp(
                balanced,
                inputs,
                eye,
                self.memo,
                kind="whole",
                final=True,
                try_vmap=path != "loop",
                buffers=self.buffers,
            )
            blocks = grads[: len(shared)]
            task_grads = [None if g is None else g.sum(0) for g in grads[len(shared) :]]
        self.last_path = path
        combination = _apply_jacobian(balanced, shared, blocks, method, self.buffers)
        _accumulate(task_params, task_grads, owned=path != "features")  # sums over K, unless captured
        return combination

    def apply_weights(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        weights: Tensor,
        max_norm: float | None,
    ) -> None:
        """Accumulate Jᵀw (clipped to ``max_norm``) into ``θ.grad`` and ∇ Σ ℓ̃ into the task parameters.

        The reuse step of amortised weights: no J, no G. The task parameters' backward runs first and only
        through the part of the graph between them and ℓ̃ (the heads); the backward of Σ_k w_k ℓ̃_k into θ then
        frees the graph, like an ordinary ``backward()``. Cost: one backward plus one more through the heads.
        """
        _check_weights(weights, balanced.shape[0])
        if task_params:
            ones = torch.ones_like(balanced)
            _accumulate(
                task_params, torch.autograd.grad(balanced, task_params, ones, retain_graph=True, allow_unused=True)
            )
        self.last_path = "reuse"
        if max_norm is None:  # straight into .grad, exactly like backward()
            torch.autograd.backward(balanced, weights.to(balanced.dtype), inputs=list(shared))
            return
        update = torch.autograd.grad(balanced, shared, weights.to(balanced.dtype), allow_unused=True)
        _accumulate(shared, _clip_blocks(update, max_norm), owned=True)

    # -- paths -------------------------------------------------------------------------------------------------
    def _features(
        self, balanced: Tensor, shared: Sequence[Tensor], features: Tensor, split: _FeatureCut, trunk_vmap: bool
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Per-task blocks of θ, and ∇ Σ ℓ̃ of head-side then trunk-side task parameters."""
        jz, head_grads = self._features_jacobian(balanced, features, split)
        inputs = [*shared, *split.trunk_side]
        grads = batched_vjp(
            features, inputs, jz, self.memo, kind="trunk", final=True, try_vmap=trunk_vmap, buffers=self.buffers
        )
        trunk_grads = [None if g is None else g.sum(0) for g in grads[len(shared) :]]
        return grads[: len(shared)], [*head_grads, *trunk_grads]

    def _features_jacobian(
        self, balanced: Tensor, features: Tensor, split: _FeatureCut
    ) -> tuple[Tensor, list[Tensor | None]]:
        tasks = task_split(balanced, features, balanced.shape[0])
        return features_jacobian(balanced, features, split.head_side, tasks, self.memo, self.buffers)

    def _gramian(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        features: Tensor | None,
        split: _FeatureCut,
        method: GradientBalancer,
    ) -> Combination:
        n = balanced.shape[0]
        if split.exact:
            assert features is not None
            jz, head_grads = self._features_jacobian(balanced, features, split)
            gramian, trunk_grads = streaming_gramian(
                features, shared, split.trunk_side, jz, self.memo, kind="trunk", final=False
            )
            self.last_path = "gramian"
            combination = _combine(method, gramian, balanced.detach())
            weights = _weights_for_gramian(combination, gramian, method)
            cotangent = torch.tensordot(weights.to(jz.dtype), jz, dims=1)
            update = torch.autograd.grad(features, shared, cotangent, allow_unused=True)
            _accumulate(shared, update)
            _accumulate([*split.head_side, *split.trunk_side], [*head_grads, *trunk_grads])
            return combination
        eye = torch.eye(n, dtype=balanced.dtype, device=balanced.device)
        gramian, _ = streaming_gramian(balanced, shared, [], eye, self.memo, kind="whole", final=False)
        self.last_path = "gramian"
        combination = _combine(method, gramian, balanced.detach())
        weights = _weights_for_gramian(combination, gramian, method)
        if task_params:
            ones = torch.ones_like(balanced)
            _accumulate(
                task_params, torch.autograd.grad(balanced, task_params, ones, retain_graph=True, allow_unused=True)
            )
        update = torch.autograd.grad(balanced, shared, weights.to(balanced.dtype), allow_unused=True)
        _accumulate(shared, update)
        return combination

    def _representation(
        self, balanced: Tensor, shared: Sequence[Tensor], features: Tensor, split: _FeatureCut, method: GradientBalancer
    ) -> Combination:
        n = balanced.shape[0]
        jz, head_grads = self._features_jacobian(balanced, features, split)
        self.last_path = "representation"
        flat = jz.reshape(n, -1)
        combination = _combine(method, flat @ flat.T if method.needs == "gramian" else flat, balanced.detach())
        if combination.weights is not None and combination.direction is None:
            _check_weights(combination.weights, n)
            cotangent = (combination.weights.to(flat.dtype) @ flat).reshape(features.shape)
        else:
            assert combination.direction is not None
            _check_direction(combination.direction, flat.shape[1], "the flattened features")
            cotangent = combination.direction.to(features.dtype).reshape(features.shape)
        inputs = [*shared, *split.trunk_side]
        if split.trunk_side:  # they need ∇ Σ ℓ̃ = the product with Σ_k J_z[k]: one 2-batched trunk pass for both
            both = torch.stack([cotangent, jz.sum(0)])
            grads = batched_vjp(features, inputs, both, self.memo, kind="trunk", final=True)
            update = [None if g is None else g[0] for g in grads[: len(shared)]]
            trunk_grads = [None if g is None else g[1] for g in grads[len(shared) :]]
        else:
            update = list(torch.autograd.grad(features, inputs, cotangent, allow_unused=True))
            trunk_grads = []
        if method.max_norm is not None:
            update = _clip_blocks(update, method.max_norm)
        _accumulate(shared, update)
        _accumulate([*split.head_side, *split.trunk_side], [*head_grads, *trunk_grads])
        return combination


#: "auto" keeps J only while it takes at most this share of the memory available on its device
JACOBIAN_MEMORY_SHARE = 0.5


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: the driver's free memory; CPU: Linux MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def resolve_auto(
    exact: bool, device: torch.device, jacobian_bytes: int = 0, reads_gramian: bool = False
) -> tuple[EnginePath, bool]:
    """What ``"auto"`` runs: (path, whether the K products through the trunk go through vmap).

    Features-first whenever it is exact: it runs the heads about once instead of K times. The K products through
    the trunk (or the whole graph when features-first is not exact) go through vmap on accelerators, where one
    batched kernel beats K launches, and one task at a time on the CPU, where vmap gains nothing and its
    convolution rules (grouped convolutions) cost more than K plain backward calls (the ``engine ... (w = 1)``
    rows of ``taskbalance bench speed``). A method that reads only G gets the Gramian path, which never holds J,
    when J (``jacobian_bytes``) would take more than :data:`JACOBIAN_MEMORY_SHARE` of the available memory: one
    more trunk backward instead of running out of memory.
    """
    vmap = device.type != "cpu"
    if reads_gramian and jacobian_bytes > 2**28:  # below 256 MB J is never the problem: skip the query
        available = available_memory(device)
        if available is not None and jacobian_bytes > JACOBIAN_MEMORY_SHARE * available:
            return "gramian", vmap
    if exact:
        return "features", vmap
    return ("batched" if vmap else "loop"), vmap


def apply_gradient_method(
    balanced: Tensor,
    shared: Sequence[Tensor],
    task_params: Sequence[Tensor],
    method: GradientBalancer,
    features: Tensor | None = None,
    path: EnginePath | Engine = "auto",
) -> Combination:
    """Compute what ``method`` needs, combine, and accumulate the gradients. Returns the method's Combination.

    ``path`` is a path name (a fresh :class:`Engine`, which knows nothing of earlier steps) or an ``Engine``.
    """
    engine = path if isinstance(path, Engine) else Engine(path)
    return engine(balanced, shared, task_params, method, features)


# -- applying a combination ----------------------------------------------------------------------------------------
def _apply_jacobian(
    balanced: Tensor,
    shared: Sequence[Tensor],
    blocks: Sequence[Tensor | None],
    method: GradientBalancer,
    buffers: BlockBuffers | None = None,
) -> Combination:
    """The method's combination of the per-parameter blocks (K, *p.shape), and the clipped update into ``θ.grad``.

    A method that reads G gets Σ_p B_p B_pᵀ and its update is Σ_k w_k B_p per block: J is never concatenated.
    A method that reads J gets the concatenation (K × P) and the update is split back into the parameters.
    """
    n = balanced.shape[0]
    full = [b if b is not None else p.new_zeros((n, *p.shape)) for b, p in zip(blocks, shared, strict=True)]
    if method.needs == "gramian":
        gramian = full[0].new_zeros((n, n))
        for block in full:
            flat = block.reshape(n, -1)
            gramian.addmm_(flat, flat.T)
        combination = _combine(method, gramian, balanced.detach())
        weights = _weights_for_gramian(combination, gramian, method)
        updates = [(weights.to(b.dtype) @ b.reshape(n, -1)).view(p.shape) for b, p in zip(full, shared, strict=True)]
        _accumulate(shared, updates, owned=True)
        return combination
    rows = [b.reshape(n, -1) for b in full]
    size = sum(r.shape[1] for r in rows)
    # J is valid during the method's call only (a method keeps copies, never J itself): reused across steps
    jacobian = torch.cat(rows, dim=1, out=None if buffers is None else buffers.get(("J",), (n, size), rows[0]))
    combination = _combine(method, jacobian, balanced.detach())
    if combination.direction is not None:
        _check_direction(combination.direction, jacobian.shape[1], "the shared parameters")
        update = combination.direction.to(jacobian.dtype)
    else:
        assert combination.weights is not None
        _check_weights(combination.weights, n)
        update = combination.weights.to(jacobian.dtype) @ jacobian
    update = clip_update(update, method.max_norm)
    # a direction may be the method's own state: copied into .grad, never handed over
    owned = combination.direction is None or method.max_norm is not None
    _accumulate(shared, list(torch.split(update, [p.numel() for p in shared])), owned=owned)
    return combination


def _combine(method: GradientBalancer, matrix: Tensor, losses: Tensor) -> Combination:
    combination: Combination = method(matrix, losses)
    return combination


def _weights_for_gramian(combination: Combination, gramian: Tensor, method: GradientBalancer) -> Tensor:
    """The method's w, scaled so that ‖Jᵀw‖ = √(wᵀGw) is at most ``method.max_norm``."""
    if combination.weights is None:
        raise ValueError(
            f"{type(method).__name__} reads only G (needs='gramian') but returned no weights: a method that never "
            "sees J must express its update as weights"
        )
    _check_weights(combination.weights, gramian.shape[0])
    weights = combination.weights.to(gramian.dtype)
    if method.max_norm is None:
        return weights
    norm = torch.sqrt(torch.clamp(weights @ gramian @ weights, min=0.0))
    return weights * _clip_factor(norm, method.max_norm)


def _check_weights(weights: Tensor, n: int) -> None:
    if weights.shape != (n,):
        raise ValueError(f"a gradient method returned weights of shape {tuple(weights.shape)}, expected ({n},)")


def _check_direction(direction: Tensor, size: int, what: str) -> None:
    if direction.shape != (size,):
        raise ValueError(
            f"a gradient method returned a direction of shape {tuple(direction.shape)}, expected ({size},): "
            f"one entry per coordinate of {what}"
        )


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor | None], owned: bool = False) -> None:
    """Add each gradient into its parameter's ``.grad`` like ``backward()`` does (a new tensor when None).

    ``owned`` says the gradients were made by the engine for this purpose and nothing else refers to them (an
    update computed here, a sum over tasks): a new ``.grad`` then takes the tensor itself when its layout is the
    parameter's. Otherwise (tensors from autograd, which may hand one tensor to two parameters; a method's
    direction, which may be its state) a copy in the parameter's layout is made, so that in-place work on one
    ``.grad`` (``zero_grad(set_to_none=False)``, clipping) cannot reach anything else.
    """
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        g = g.detach().reshape(p.shape)
        if p.grad is not None:
            p.grad.add_(g)
        elif owned and g.stride() == p.stride():
            p.grad = g
        else:
            p.grad = torch.empty_like(p).copy_(g)
