"""The Engine: one per training run; its checks, the Balancer's step, and each path (see :mod:`taskbalance.engine`)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..gradient_balancing.base import Combination, GradientBalancer
from .combine import apply_blocks, call_method, check_direction, check_weights, reads_gramian, weights_for_gramian
from .context import StepContext
from .distributed import Ranks
from .finite import require_finite, row_norms
from .grad import accumulate, accumulate_summed, backward, clip_blocks, unaliased
from .graph import FeatureCut, reachable_leaves, task_split, through_compiled
from .heads import features_jacobian
from .paths import CUT_PATHS, ENGINE_PATHS, FEATURE_PATHS, VMAP_PATHS, EnginePath, candidates, resolve_rule
from .reuse import WeightReuse
from .tuning import PathTuner, Trial, signature, synchronize
from .vjp import (
    BlockBuffers,
    EngineFallbackWarning,
    VmapMemo,
    batched_vjp,
    streaming_gramian,
    summed_gradient,
)

#: what torch warns when vmap runs an op without a batching rule as a loop over the batch
_NO_BATCHING_RULE = "we have not yet implemented the batching rule"


class CompiledModelWarning(RuntimeWarning):
    """A model compiled as one graph hides the features from ``auto``, which then takes K full backward passes."""


class Engine:
    """Obtains per-task gradients along one of :data:`ENGINE_PATHS` and applies a gradient method's update.

    Keep one ``Engine`` per training run: it remembers whether vmap can run the model's backward graph, so a
    failing batched attempt is paid (and warned about) once, and once vmap is known to work the last backward of
    each step frees the graph like an ordinary ``backward()``. ``last_path`` names the path the last call took
    (``"auto"`` resolved; ``"sum"`` and ``"reuse"`` for :meth:`step`), and :attr:`fell_back` says whether vmap
    failed, for logs and tests. ``update_weights_every`` amortises weight-based methods (:attr:`reuse`).

    ``check_finite`` (default True): every step checks what it computed — G, the row norms of J, the task
    parameters' gradients, the summed or reused update — for NaN/Inf once, before the method combines and before
    ``.grad`` is written (:mod:`~taskbalance.engine.finite`), and raises instead. The steps without per-task
    gradients then take their gradients with ``autograd.grad`` and add them in (same values); ``False`` lets
    non-finite values through and runs those steps as an ordinary ``backward()`` again, which also fires hooks
    registered on gradient accumulation.
    """

    def __init__(self, path: EnginePath = "auto", update_weights_every: int = 1, check_finite: bool = True) -> None:
        self.reuse = WeightReuse(update_weights_every)
        self.check_finite = check_finite
        if path not in ENGINE_PATHS:
            raise ValueError(f"unknown engine path {path!r}; choose from {', '.join(ENGINE_PATHS)}")
        self.path: EnginePath = path
        self.memo = VmapMemo()
        self.buffers = BlockBuffers()
        self.last_path = ""
        self.context = StepContext()
        self.warned_compiled = False
        self.tuner = PathTuner()

    @property
    def fell_back(self) -> bool:
        """Whether vmap failed on this model, so that products are taken one task at a time (also when it failed
        silently, for a challenger in a trial of ``"auto"``)."""
        return bool(self.memo.failed)

    def reset(self) -> None:
        """Forget what was learnt about vmap and the paths on the model and the reused weights, and free the reused
        buffers."""
        self.memo = VmapMemo()
        self.tuner.reset()
        self.buffers.clear()
        self.last_path = ""
        self.reuse.reset()

    def __repr__(self) -> str:
        return f"Engine({self.path!r})"

    # -- checks: made before anything runs ---------------------------------------------------------------------
    def check_method(self, method: GradientBalancer) -> None:
        """Refuse a method this engine cannot serve: the Gramian path and reused weights need one that reads G."""
        if method.needs != "jacobian":
            return
        name = type(method).__name__
        if self.path == "gramian":
            raise ValueError(f"engine 'gramian' needs a method that reads only G; {name} reads J")
        if self.reuse.every > 1:
            raise ValueError(
                f"update_weights_every needs a weight-based gradient method; {name} returns an update that is not "
                "Jᵀw (it reads J), so there are no weights to reuse"
            )

    def check(
        self,
        losses: Tensor,
        shared: Sequence[Tensor],
        method: GradientBalancer,
        features: Tensor | None = None,
        context: StepContext | None = None,
    ) -> None:
        """Refuse a call of :meth:`step` this engine cannot serve, from the raw losses L, before the loss method runs.

        The feature cut is the same seen from L or from ℓ̃: a loss method reaches θ only through L.
        """
        self.check_method(method)
        if context is not None and context.exact_ranks is not None and self.path in ("gramian", "representation"):
            raise ValueError(
                f"engine {self.path!r} cannot balance the global batch of a process group exactly (it never holds "
                "the per-task gradients that the ranks must average); choose another engine, or "
                "distributed='local' to solve on each rank's shard"
            )
        if method.needs != "nothing" and self.path in FEATURE_PATHS:
            _require_exact(self.path, FeatureCut(losses, features, shared, []))

    # -- the Balancer's step ---------------------------------------------------------------------------------------
    def step(
        self,
        losses: Tensor,
        balanced: Tensor,
        shared: Sequence[Tensor],
        method: GradientBalancer,
        features: Tensor | None = None,
        context: StepContext | None = None,
    ) -> Combination | None:
        """One balanced backward after :meth:`check`: sum, reuse, or solve. Returns the method's Combination.

        A method that needs nothing (Sum) gets one ordinary backward of Σ_k ℓ̃_k and None is returned. Otherwise
        the heads and the methods' own parameters (every leaf of ℓ̃ outside ``shared``) get ∇ Σ ℓ̃, and θ the
        update of reused weights (returned as a Combination in the dtype and on the device of the raw ``losses``)
        or of the method's solve along this engine's path. ``balanced`` carries the ``context``'s loss scale, and
        its gradients are averaged over the context's ranks (:mod:`~taskbalance.engine.distributed`).
        """
        self.context = StepContext() if context is None else context
        if method.needs == "nothing":
            self.last_path = "sum"
            if not self.check_finite and self.context.ranks is None:
                backward(balanced.sum())
                return None
            leaves = reachable_leaves(balanced)
            grads: list[Tensor | None] = list(torch.autograd.grad(balanced.sum(), leaves, allow_unused=True))
            if self.context.ranks is not None:
                grads = self.context.ranks.mean_grads(leaves, grads)
            if self.check_finite:
                require_finite(None, grads)
            accumulate(leaves, unaliased(grads), owned=True)
            return None
        shared_ids = {id(p) for p in shared}
        task_params = [t for t in reachable_leaves(balanced) if id(t) not in shared_ids]
        reused = self.reuse.due()
        if reused is not None:
            weights = reused.to(device=losses.device, dtype=losses.dtype)
            self.apply_weights(balanced, shared, task_params, weights, method.max_norm)
            return Combination(weights=weights)
        combination = self._solve(balanced, shared, task_params, method, features)
        self.reuse.keep(combination)
        return combination

    def raw_jacobian(self, losses: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
        """The per-task gradients of the raw ``losses`` for each input, (K, *p.shape) (zeros where unused): what a
        micro-batch of exact accumulation records (:mod:`~taskbalance.engine.accumulation`). Frees the graph."""
        n = losses.shape[0]
        eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
        vmap = self.path in VMAP_PATHS or (self.path not in ("loop", "features_loop") and losses.device.type != "cpu")
        blocks = batched_vjp(losses, inputs, eye, self.memo, kind="raw", final=True, try_vmap=vmap)
        return [p.new_zeros((n, *p.shape)) if b is None else b for b, p in zip(blocks, inputs, strict=True)]

    def feature_rows(self, losses: Tensor, features: Tensor) -> Tensor:
        """The per-task gradients of ``losses`` w.r.t. the flattened ``features`` (K × numel), keeping the graph:
        what the representation path reads, recorded by a micro-batch of exact accumulation."""
        n = losses.shape[0]
        eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
        vmap = losses.device.type != "cpu"
        (rows,) = batched_vjp(losses, [features], eye, self.memo, kind="raw features", final=False, try_vmap=vmap)
        return features.new_zeros((n, features.numel())) if rows is None else rows.reshape(n, -1)

    def step_blocks(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        blocks: Sequence[Tensor | None],
        task_params: Sequence[Tensor],
        task_grads: Sequence[Tensor | None],
        method: GradientBalancer,
        context: StepContext,
        represented: Tensor | None = None,
    ) -> Combination | None:
        """One balanced step from per-task blocks of θ computed beforehand (accumulated micro-batches, averaged
        over exact ranks already): sum, reuse or solve, as :meth:`step` does from a graph. ``balanced`` holds the
        values of ℓ̃ and, like the blocks and ``task_grads``, carries the context's loss scale. ``represented``:
        J_z of ℓ̃ (K × numel of the features), which the representation path hands the method instead of J."""
        self.context = context
        n = balanced.shape[0]
        if method.needs == "nothing":
            self.last_path = "sum"
            update: list[Tensor | None] = [None if b is None else b.sum(0) for b in blocks]
            if self.check_finite:
                require_finite(None, [*update, *task_grads], agree=context.agree)
            self._write(shared, update, True, task_params, task_grads, True)
            return None
        reused = self.reuse.due()
        if reused is not None:
            self.last_path = "reuse"
            weights = reused.to(device=balanced.device, dtype=balanced.dtype)
            check_weights(weights, n)
            update = self._weighted(blocks, shared, Combination(weights=weights), method)
            if self.check_finite:
                require_finite(None, [*update, *task_grads], agree=context.agree)
            self._write(shared, update, True, task_params, task_grads, True)
            return Combination(weights=weights)
        if represented is not None:
            combination = self._represented_blocks(balanced, shared, blocks, represented, method)
            self._write(
                shared, self._weighted(blocks, shared, combination, method), True, task_params, task_grads, True
            )
            self.reuse.keep(combination)
            return combination
        self.last_path = "accumulated"
        check = task_grads if self.check_finite else None
        combination, update, owned = apply_blocks(balanced, shared, blocks, method, None, check, context)
        self._write(shared, update, owned, task_params, task_grads, True)
        self.reuse.keep(combination)
        return combination

    def _represented_blocks(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        blocks: Sequence[Tensor | None],
        represented: Tensor,
        method: GradientBalancer,
    ) -> Combination:
        """The representation path's solve from an accumulated J_z: the method reads J_z (or G_z) and must return
        weights, which then combine the blocks of θ (a direction in feature space needs the features' graph)."""
        self.last_path = "representation"
        gramian = reads_gramian(method)
        matrix = represented @ represented.T if gramian else represented
        if self.check_finite:
            require_finite(matrix if gramian else row_norms(represented), agree=self.context.agree)
        combination = self._call(method, matrix, balanced, power=2 if gramian else 1)
        if combination.weights is None or combination.direction is not None:
            raise ValueError(
                f"{type(method).__name__} returned a direction in feature space, which accumulated micro-batches "
                "cannot apply (their graphs are freed); use another engine path to accumulate with it"
            )
        check_weights(combination.weights, balanced.shape[0])
        return combination

    def _weighted(
        self,
        blocks: Sequence[Tensor | None],
        shared: Sequence[Tensor],
        combination: Combination,
        method: GradientBalancer,
    ) -> list[Tensor | None]:
        """Σ_k w_k B_k per block of θ, clipped to the method's ``max_norm`` (blocks and update carry the scale)."""
        assert combination.weights is not None
        n = combination.weights.shape[0]
        update: list[Tensor | None] = [
            None if b is None else (combination.weights.to(b.dtype) @ b.reshape(n, -1)).view(p.shape)
            for b, p in zip(blocks, shared, strict=True)
        ]
        max_norm = self.context.max_norm(method.max_norm)
        return update if max_norm is None else clip_blocks(update, max_norm)

    def __call__(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        method: GradientBalancer,
        features: Tensor | None = None,
    ) -> Combination:
        """Compute what ``method`` needs, combine, and accumulate the gradients. Returns the method's Combination.

        The per-task path alone, for any method (one that needs nothing is handed G): no amortisation.
        """
        self.check_method(method)
        return self._solve(balanced, shared, task_params, method, features)

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
        check_weights(weights, balanced.shape[0])
        self.last_path = "reuse"
        ranks = self.context.ranks
        if max_norm is None and not self.check_finite and ranks is None:  # straight into .grad, like backward()
            accumulate_summed(balanced, task_params)
            backward(balanced, weights.to(balanced.dtype), shared)
            return
        task_grads = summed_gradient(balanced, task_params)
        update: list[Tensor | None] = list(
            torch.autograd.grad(balanced, shared, weights.to(balanced.dtype), allow_unused=True)
        )
        if ranks is not None:  # reused weights are the same on every rank only in exact mode: average the update
            both = ranks.mean_grads([*shared, *task_params], [*update, *task_grads])
            update, task_grads = both[: len(shared)], both[len(shared) :]
        if self.check_finite:
            require_finite(None, [*update, *task_grads])
        accumulate(task_params, task_grads)
        max_norm = self.context.max_norm(max_norm)
        accumulate(shared, unaliased(update) if max_norm is None else clip_blocks(update, max_norm), owned=True)

    # -- paths -------------------------------------------------------------------------------------------------
    def _solve(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        method: GradientBalancer,
        features: Tensor | None,
    ) -> Combination:
        path = self.path
        split = FeatureCut(balanced, features if path in CUT_PATHS else None, shared, task_params)
        if path in FEATURE_PATHS:
            _require_exact(path, split)
        trial: tuple[str, Trial] | None = None
        if path in ("auto", "heuristic"):
            if features is not None and not split.exact:
                self._warn_compiled(balanced)
            path, trial = self._choose(balanced, shared, features, split, method)
        if path == "representation":
            assert features is not None
            return self._representation(balanced, shared, features, split, method)
        if path == "gramian":
            return self._gramian(balanced, shared, task_params, features, split, method)
        if trial is None:
            blocks, task_params, task_grads = self._gradients(path, balanced, shared, task_params, features, split)
        else:
            blocks, task_params, task_grads = self._trial_step(*trial, balanced, shared, task_params, features, split)
        self.last_path = path
        ranks = self.context.exact_ranks
        if ranks is not None:  # the global batch's per-task gradients: the mean over ranks, in one all-reduce
            blocks, task_grads = _mean_blocks(ranks, balanced.shape[0], shared, blocks, task_params, task_grads)
        check = task_grads if self.check_finite else None
        combination, update, owned = apply_blocks(balanced, shared, blocks, method, self.buffers, check, self.context)
        # task gradients: sums over K, unless captured by the features path (or reduced)
        captured = path in ("features", "features_loop") and ranks is None
        self._write(shared, update, owned, task_params, task_grads, not captured)
        return combination

    def _choose(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        features: Tensor | None,
        split: FeatureCut,
        method: GradientBalancer,
    ) -> tuple[EnginePath, tuple[str, Trial] | None]:
        """The exact path of ``"heuristic"`` (the rule) or ``"auto"`` (measured, :mod:`~.tuning`), and the trial
        this step belongs to, if any (its gradients are then the rule's)."""
        # the exact ranks average J: never the Gramian path, which does not hold it
        gramian_only = reads_gramian(method) and self.context.exact_ranks is None
        size = balanced.shape[0] * sum(p.numel() * p.element_size() for p in shared) if gramian_only else 0
        rule = resolve_rule(split.exact, balanced.device, size, gramian_only)
        if self.path == "heuristic" or rule == "gramian" or torch.are_deterministic_algorithms_enabled():
            return rule, None
        key = signature(balanced, shared, features, split.exact, gramian_only)
        options = candidates(split.exact, gramian_only, vmap_failed=bool(self.memo.failed))
        trial = self.tuner.trial(key, rule, options if rule in options else [rule, *options])
        if trial is None:
            return self.tuner.chosen[key], None  # type: ignore[return-value]  # TIMED_PATHS, checked on load
        return rule, (key, trial)

    def _gradients(
        self,
        path: EnginePath,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        features: Tensor | None,
        split: FeatureCut,
        final: bool = True,
        own_buffers: bool = True,
    ) -> tuple[list[Tensor | None], list[Tensor], list[Tensor | None]]:
        """Per-task blocks of θ along an exact path that holds J, the task parameters and their ∇ Σ ℓ̃.

        ``final``: no later pass of the step needs the graph. ``own_buffers``: the blocks may live in the engine's
        reused buffers (a timed challenger of a trial must not overwrite the incumbent's there).
        """
        buffers = self.buffers if own_buffers else None
        vmap = path in VMAP_PATHS
        if path in ("features", "features_loop"):
            assert features is not None
            jz, head_grads = self._features_jacobian(balanced, features, split, buffers)
            inputs = [*shared, *split.trunk_side]
            grads = batched_vjp(
                features, inputs, jz, self.memo, kind="trunk", final=final, try_vmap=vmap, buffers=buffers
            )
            trunk_grads = [None if g is None else g.sum(0) for g in grads[len(shared) :]]
            return grads[: len(shared)], [*split.head_side, *split.trunk_side], [*head_grads, *trunk_grads]
        eye = torch.eye(balanced.shape[0], dtype=balanced.dtype, device=balanced.device)
        inputs = [*shared, *task_params]
        grads = batched_vjp(balanced, inputs, eye, self.memo, kind="whole", final=final, try_vmap=vmap, buffers=buffers)
        task_grads = [None if g is None else g.sum(0) for g in grads[len(shared) :]]
        return grads[: len(shared)], list(task_params), task_grads

    def _trial_step(
        self,
        key: str,
        trial: Trial,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        features: Tensor | None,
        split: FeatureCut,
    ) -> tuple[list[Tensor | None], list[Tensor], list[Tensor | None]]:
        """One step of ``"auto"``'s trial: every candidate timed on this step's graph, the incumbent's gradients
        returned. A challenger that fails (vmap cannot run the graph, out of memory) leaves the trial without a word."""
        kept: tuple[list[Tensor | None], list[Tensor], list[Tensor | None]] | None = None
        order = trial.order()
        with_gramian = "gramian" in trial.candidates  # then J's paths pay for G and Jᵀw too, as the step will
        for position, candidate in enumerate(order):
            final = position == len(order) - 1
            synchronize(balanced.device)
            start = time.perf_counter()
            if candidate == trial.incumbent:
                kept = self._gradients(candidate, balanced, shared, task_params, features, split, final)  # type: ignore[arg-type]
                if with_gramian:
                    _combined_cost(kept[0], balanced.shape[0])
            else:
                trouble = self._challenge(
                    candidate, balanced, shared, task_params, features, split, final, with_gramian
                )
                if trouble:
                    trial.drop(candidate, trouble)
            synchronize(balanced.device)
            trial.record(candidate, time.perf_counter() - start)
        self.tuner.end_step(key)
        assert kept is not None  # the incumbent is never dropped
        return kept

    def _challenge(
        self,
        candidate: str,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        features: Tensor | None,
        split: FeatureCut,
        final: bool,
        with_gramian: bool,
    ) -> str:
        """Run a challenger's gradients and throw them away; why it must leave the trial ('' if it need not)."""
        failed_before = set(self.memo.failed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if candidate == "gramian":
                    _, _, _, update_of = self._streamed(balanced, shared, task_params, features, split, False)
                    update_of(torch.ones_like(balanced), final)
                else:
                    blocks = self._gradients(
                        candidate,  # type: ignore[arg-type]
                        balanced,
                        shared,
                        task_params,
                        features,
                        split,
                        final,
                        own_buffers=False,
                    )[0]
                    if with_gramian:
                        _combined_cost(blocks, balanced.shape[0])
            except RuntimeError as error:  # out of memory, an op it cannot run: not a path for this model
                return f"failed: {type(error).__name__}: {str(error)[:200]}"
        if self.memo.failed - failed_before:  # it ran as a loop after all: not the path it stands for
            return f"vmap cannot run this graph (the {', '.join(sorted(self.memo.failed - failed_before))} pass)"
        slow = [w for w in caught if _NO_BATCHING_RULE in str(w.message)]
        if slow:  # vmap loops over the batch for that op (QM9's GRU under torch.func.vmap): slow, and not asked for
            return f"vmap has no batching rule for an op of this graph: {str(slow[0].message)[:160]}"
        for warning in caught:  # the user's to see, as the incumbent would have shown them
            if not issubclass(warning.category, EngineFallbackWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return ""

    def _write(
        self,
        shared: Sequence[Tensor],
        update: Sequence[Tensor | None],
        owned: bool,
        task_params: Sequence[Tensor],
        task_grads: Sequence[Tensor | None],
        owned_task: bool = False,
    ) -> None:
        """The update into ``θ.grad`` and the task parameters' gradients into theirs; with ``"local"`` ranks, both
        averaged over the ranks first (one all-reduce)."""
        ranks = self.context.local_ranks
        if ranks is not None:
            both = ranks.mean_grads([*shared, *task_params], [*update, *task_grads])
            update, task_grads, owned, owned_task = both[: len(shared)], both[len(shared) :], True, True
        accumulate(task_params, task_grads, owned=owned_task)
        accumulate(shared, update, owned=owned)

    def _warn_compiled(self, balanced: Tensor) -> None:
        """Say once why a compiled model costs K full backward passes, and what to do."""
        if self.warned_compiled or not through_compiled(balanced):
            return
        self.warned_compiled = True
        warnings.warn(
            "taskbalance engine: the model is compiled as one graph (torch.compile), so its features and heads sit "
            "inside one compiled node and 'auto' cannot take the features-first path: each step runs K backward "
            "passes through the whole model instead. Compile the encoder alone (model.encoder = "
            "torch.compile(model.encoder)) and keep the heads and the balancer eager: same gradients, features-first.",
            CompiledModelWarning,
            stacklevel=5,
        )

    def _features_jacobian(
        self, balanced: Tensor, features: Tensor, split: FeatureCut, buffers: BlockBuffers | None
    ) -> tuple[Tensor, list[Tensor | None]]:
        tasks = task_split(balanced, features, balanced.shape[0])
        return features_jacobian(balanced, features, split.head_side, tasks, self.memo, buffers)

    def _gramian(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        features: Tensor | None,
        split: FeatureCut,
        method: GradientBalancer,
    ) -> Combination:
        gramian, owners, grads, update_of = self._streamed(balanced, shared, task_params, features, split)
        self.last_path = "gramian"
        if self.check_finite:
            require_finite(gramian, grads, agree=self.context.agree)
        combination = self._call(method, gramian, balanced, power=2)
        weights = weights_for_gramian(combination, gramian, method, self.context.max_norm(method.max_norm))
        self._write(shared, update_of(weights, True), False, owners, grads)
        return combination

    def _streamed(
        self,
        balanced: Tensor,
        shared: Sequence[Tensor],
        task_params: Sequence[Tensor],
        features: Tensor | None,
        split: FeatureCut,
        own_buffers: bool = True,
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None], Callable[[Tensor, bool], list[Tensor | None]]]:
        """The Gramian path's G (streamed, J never held), the task parameters and their ∇ Σ ℓ̃, and its update:
        for weights w, the backward of Σ_k w_k ℓ̃_k into θ (through the trunk alone when the cut is exact)."""
        if split.exact:
            assert features is not None
            jz, head_grads = self._features_jacobian(balanced, features, split, self.buffers if own_buffers else None)
            gramian, trunk_grads = streaming_gramian(
                features, shared, split.trunk_side, jz, self.memo, kind="trunk", final=False
            )

            def through_trunk(weights: Tensor, final: bool) -> list[Tensor | None]:
                cotangent = torch.tensordot(weights.to(jz.dtype), jz, dims=1)
                return list(torch.autograd.grad(features, shared, cotangent, retain_graph=not final, allow_unused=True))

            return gramian, [*split.head_side, *split.trunk_side], [*head_grads, *trunk_grads], through_trunk
        eye = torch.eye(balanced.shape[0], dtype=balanced.dtype, device=balanced.device)
        gramian, _ = streaming_gramian(balanced, shared, [], eye, self.memo, kind="whole", final=False)
        task_grads = summed_gradient(balanced, task_params)

        def through_graph(weights: Tensor, final: bool) -> list[Tensor | None]:
            cotangent = weights.to(balanced.dtype)
            return list(torch.autograd.grad(balanced, shared, cotangent, retain_graph=not final, allow_unused=True))

        return gramian, list(task_params), task_grads, through_graph

    def _call(self, method: GradientBalancer, matrix: Tensor, balanced: Tensor, power: int) -> Combination:
        """The method's combination of J (``power`` 1) or G (2) and ℓ̃, as they are without the loss scale."""
        context = self.context
        return call_method(method, context.unscaled(matrix, power), context.unscaled(balanced.detach()))

    def _representation(
        self, balanced: Tensor, shared: Sequence[Tensor], features: Tensor, split: FeatureCut, method: GradientBalancer
    ) -> Combination:
        n = balanced.shape[0]
        jz, head_grads = self._features_jacobian(balanced, features, split, self.buffers)
        self.last_path = "representation"
        flat = jz.reshape(n, -1)
        matrix = flat @ flat.T if reads_gramian(method) else flat
        if self.check_finite:
            rows = flat  # what the method reads: J_z, and its Gramian
            require_finite(
                matrix if reads_gramian(method) else row_norms(flat),
                head_grads,
                rows_finite=lambda: torch.isfinite(rows).all(dim=1),
                agree=self.context.agree,
            )
        combination = self._call(method, matrix, balanced, power=2 if reads_gramian(method) else 1)
        if combination.weights is not None and combination.direction is None:
            check_weights(combination.weights, n)
            cotangent = (combination.weights.to(flat.dtype) @ flat).reshape(features.shape)
        else:
            assert combination.direction is not None
            check_direction(combination.direction, flat.shape[1], "the flattened features")
            cotangent = self.context.scaled(combination.direction.to(features.dtype).reshape(features.shape))
        inputs = [*shared, *split.trunk_side]
        if split.trunk_side:  # they need ∇ Σ ℓ̃ = the product with Σ_k J_z[k]: one 2-batched trunk pass for both
            both = torch.stack([cotangent, jz.sum(0)])
            grads = batched_vjp(features, inputs, both, self.memo, kind="trunk", final=True)
            update = [None if g is None else g[0] for g in grads[: len(shared)]]
            trunk_grads = [None if g is None else g[1] for g in grads[len(shared) :]]
        else:
            update = list(torch.autograd.grad(features, inputs, cotangent, allow_unused=True))
            trunk_grads = []
        max_norm = self.context.max_norm(method.max_norm)
        if max_norm is not None:
            update = clip_blocks(update, max_norm)
        self._write(shared, update, False, [*split.head_side, *split.trunk_side], [*head_grads, *trunk_grads])
        return combination


def _mean_blocks(
    ranks: Ranks,
    n: int,
    shared: Sequence[Tensor],
    blocks: Sequence[Tensor | None],
    task_params: Sequence[Tensor],
    task_grads: Sequence[Tensor | None],
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """The per-task blocks of θ (K, *p.shape) and the task parameters' gradients, averaged over the ranks."""
    filled = [p.new_zeros((n, *p.shape)) if b is None else b for b, p in zip(blocks, shared, strict=True)]
    filled += [p.new_zeros(p.shape) if g is None else g for g, p in zip(task_grads, task_params, strict=True)]
    reduced: list[Tensor | None] = list(ranks.mean(filled))
    return reduced[: len(shared)], reduced[len(shared) :]


def _combined_cost(blocks: Sequence[Tensor | None], n: int) -> None:
    """G = Σ_p B_p B_pᵀ and Σ_k B_k, as a step that holds J computes them (timed against the Gramian path)."""
    for block in blocks:
        if block is not None:
            flat = block.reshape(n, -1)
            flat @ flat.T
            flat.sum(0)


def _require_exact(path: str, cut: FeatureCut) -> None:
    if not cut.exact:
        raise ValueError(f"engine {path!r} needs features through which every shared path runs: {cut.reason}")
