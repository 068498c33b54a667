"""The Balancer: one loss-balancing method composed with one gradient-balancing method.

    balanced = loss_method(L)                 # ℓ̃ (K,): e.g. IGBv1's w_k · log L_k
    update   = gradient_method(∇θ ℓ̃_1..K)     # e.g. Nash-MTL's Jᵀ α; "sum" = ∇θ Σ ℓ̃_k
    θ.grad  += update;  head.grad += ∇ Σ_k ℓ̃_k

``Balancer.backward`` replaces ``sum(losses).backward()`` in a training loop. It never steps the optimizer.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.amp import GradScaler

from .engine import Engine, EnginePath, PathTuner
from .engine.accumulation import MicroBatches, chained, loss_jacobian
from .engine.context import StepContext
from .engine.distributed import NO_SIGNATURE, DistributedMode, Ranks, check_mode, signature
from .engine.finite import NonFiniteGradientError, require_finite
from .engine.grad import accumulate as accumulate_grads
from .engine.graph import reachable_leaves
from .engine.vjp import summed_gradient
from .gradient_balancing.base import Combination, GradientBalancer
from .gradient_balancing.sum import Sum
from .loss_balancing.base import LossBalancer
from .loss_balancing.equal import Equal
from .method import Declared, atomic
from .result import BalanceResult, step_result


class Balancer(nn.Module):
    """Balanced backward for a multi-task model: ``loss`` method × ``gradient`` method over ``n_tasks`` tasks.

    Args:
        loss: a loss-balancing method (default: EW, equal weights).
        gradient: a gradient-balancing method (default: ``Sum``, one ordinary backward).
        n_tasks: K, the number of tasks (losses per step).
        engine: how per-task gradients are obtained for gradient methods (see :mod:`taskbalance.engine`):
            ``"auto"`` (default) times the exact paths on the first steps and keeps the fastest (the choice is
            part of ``state_dict()``); ``"heuristic"`` or a named path for runs reproducible to the bit.
        check_finite: raise on NaN/Inf losses, and on NaN/Inf gradients of finite losses (or gradients so large
            that G = J Jᵀ overflows), before anything is written: one more device synchronisation per step on
            CUDA. ``False`` lets such values into ``.grad`` (e.g. for a GradScaler, which skips those steps
            itself) and runs the steps without per-task gradients as a plain ``backward()``, which also fires
            hooks registered on gradient accumulation and fills ``.grad`` of non-leaf tensors that
            ``retain_grad()`` (see :class:`~taskbalance.engine.Engine`).
        update_weights_every: amortisation for weight-based gradient methods (``needs == "gramian"``): the
            method solves for its weights w on every N-th call of :meth:`backward` (the first included) and the
            calls in between reuse that w with one ordinary backward of Σ_k w_k ℓ̃_k into θ: no per-task
            gradients, no G, no solver. The loss method still runs on every call. N = 1 (default) is the exact
            method; the option is the Nash-MTL reference code's (Navon et al., 2022), offered here for every
            weight-based method. Its effect on results is staleness: w is up to N-1 steps old, and methods with
            state (GradVac's EMA, GradNorm's learnt weights, warm starts) advance it on solve steps only.
            Measured effects: docs/cost-model.md.
        distributed: on an initialised ``torch.distributed`` process group of more than one rank (``group``, or
            the world): ``"exact"`` (default) balances the global batch — every rank sees the mean losses and
            solves on the mean per-task gradients, and writes the same update; ``"local"`` solves on each rank's
            shard and averages the updates (an approximation of the method, P floats of traffic instead of K·P);
            ``"none"`` balances each rank alone (ranks that train separate models).
            See :mod:`taskbalance.engine.distributed`.
        group: the process group (default: the world).

    The Balancer is an ``nn.Module``: ``parameters()`` are the methods' learnable parameters (UW, IMTL-L),
    ``state_dict()`` holds all their state, ``to(device)`` moves them.

    Every call either completes or raises and changes nothing: :meth:`backward`, :meth:`after_step`,
    :meth:`end_epoch` and :meth:`load_state_dict` restore ``state_dict()`` exactly when they raise, and
    :meth:`backward` writes ``.grad`` only after everything that can fail has run.
    """

    def __init__(
        self,
        loss: LossBalancer | None = None,
        gradient: GradientBalancer | None = None,
        *,
        n_tasks: int,
        engine: EnginePath = "auto",
        check_finite: bool = True,
        update_weights_every: int = 1,
        distributed: DistributedMode = "exact",
        group: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(n_tasks, int) or isinstance(n_tasks, bool) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
        check_mode(distributed)
        self.distributed: DistributedMode = distributed
        self.group = group
        self._aligned = False
        self._micro_batches = MicroBatches()
        self._engine = Engine(engine, update_weights_every, check_finite)
        loss = Equal() if loss is None else loss
        gradient = Sum() if gradient is None else gradient
        if not isinstance(loss, LossBalancer):
            raise TypeError(f"loss must be a LossBalancer, got {type(loss).__name__}")
        if not isinstance(gradient, GradientBalancer):
            raise TypeError(f"gradient must be a GradientBalancer, got {type(gradient).__name__}")
        self._engine.check_method(gradient)
        self.n_tasks = n_tasks
        self.loss = loss
        self.gradient = gradient
        loss.setup(n_tasks)
        gradient.setup(n_tasks)
        self._warned_solver = False

    @property
    def path_tuner(self) -> PathTuner:
        """What ``engine="auto"`` measured: ``chosen`` (graph signature → path), ``timings`` (each candidate's best
        seconds) and ``dropped`` (the candidates that left a trial, and why)."""
        return self._engine.tuner

    @property
    def engine(self) -> EnginePath:
        """The engine path asked for (``"auto"`` unresolved; :attr:`Engine.last_path` says what ran)."""
        return self._engine.path

    @property
    def check_finite(self) -> bool:
        """Whether losses and gradients are required to be finite (the engine's setting, which it applies)."""
        return self._engine.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self._engine.check_finite = value

    @property
    def update_weights_every(self) -> int:
        """N of the amortisation: the gradient method solves on every N-th call."""
        return self._engine.reuse.every

    # -- the training step -----------------------------------------------------------------------------------
    @overload
    def backward(
        self,
        losses: Tensor | Iterable[Tensor],
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        *,
        scaler: GradScaler | None = None,
        accumulate: Literal[False] = False,
    ) -> BalanceResult: ...

    @overload
    def backward(
        self,
        losses: Tensor | Iterable[Tensor],
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        *,
        scaler: GradScaler | None = None,
        accumulate: bool,
    ) -> BalanceResult | None: ...

    def backward(
        self,
        losses: Tensor | Iterable[Tensor],
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        *,
        scaler: GradScaler | None = None,
        accumulate: bool = False,
    ) -> BalanceResult | None:
        """Balance the K losses and accumulate gradients into ``.grad``.

        Args:
            losses: the K raw task losses, a tensor of shape (K,) (or a sequence of K scalars), unscaled, as batch
                means. Losses in float16/bfloat16 (from autocast) are balanced in float32.
            shared_params: the shared parameters θ (e.g. ``model.encoder.parameters()``).
            features: the shared representation (the encoder's output) when the heads consume it; lets the
                engine take the cheaper features-first path. Optional.
            scaler: a ``torch.amp.GradScaler``: the methods see the unscaled losses and gradients, what is written
                to ``.grad`` carries the scaler's scale (so ``scaler.unscale_``/``step``/``update`` work
                unchanged), and a non-finite loss or gradient skips the step instead of raising: ``.grad`` gets
                Inf, so the scaler skips the update and backs off, and no method's state advances.
            accumulate: True on every micro-batch of an optimizer step but the last: its contribution is recorded
                and nothing is written (returns None). The next call without it balances all the micro-batches
                as one batch (:mod:`~taskbalance.engine.accumulation`): the methods' state and
                ``update_weights_every`` advance once per optimizer step.

        Each shared parameter must be listed once: the same tensor twice, or two tensors sharing memory (views
        of one parameter), is refused rather than merged, because its gradient would enter J twice (MGDA's update
        doubles, Nash-MTL's norm changes) and a list with a repeat is a mistake in building it, not a request.

        On a process group (see ``distributed``) every rank calls this with its own shard's losses; the ranks
        exchange what :mod:`~taskbalance.engine.distributed` says and write the same update.

        Raises:
            ValueError: wrong shape, NaN/Inf loss (with the task index), non-positive loss for a method that
                takes a log, a shared parameter the losses do not depend on or listed twice, an engine path the
                call cannot take (``"features"`` without features through which every shared path runs), a
                non-finite gradient of a finite loss or one whose squared norm overflows (with ``check_finite``;
                without a scaler). Nothing is changed then: ``state_dict()`` and every ``.grad`` are as before the
                call, whatever raised (the checks above come first; a failure found later, in the engine or a
                method's solver, restores the methods' state).
        """
        start = time.perf_counter()
        if scaler is not None and not isinstance(scaler, GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        with _autocast_off(), _compiled_backward_advice():
            losses = self._check_losses(losses)
            shared = self._check_shared(shared_params, losses)
            ranks = Ranks.of(self.distributed, self.group)
            if accumulate or self._micro_batches.pending:
                return self._accumulated(losses, shared, features, scaler, ranks, start, last=not accumulate)
            return self._step(losses, shared, features, scaler, ranks, start)

    def _step(
        self,
        losses: Tensor,
        shared: list[Tensor],
        features: Tensor | None,
        scaler: GradScaler | None,
        ranks: Ranks | None,
        start: float,
    ) -> BalanceResult:
        """One balanced step of the whole batch (see :meth:`backward`)."""
        self._engine.check(losses, shared, self.gradient, features, StepContext(ranks=ranks))
        values, seen = self._global_losses(losses, shared, ranks)
        if not self._values_usable(values, scaler):
            return self._skip(losses, shared, seen, scaler)
        try:
            with atomic(self):
                balanced = self.loss(seen)
                before_engine = time.perf_counter()
                context = StepContext(_scale_of(scaler, balanced.losses), ranks)
                scaled = context.scaled(balanced.losses)
                combination = self._engine.step(seen, scaled, shared, self.gradient, features, context)
        except NonFiniteGradientError:
            if scaler is None:
                raise
            return self._skip(losses, shared, seen, scaler)
        # with no gradient method the engine ran the ordinary backward of Σ ℓ̃: no overhead in it
        overhead = (before_engine if combination is None else time.perf_counter()) - start
        self._warn_unconverged(combination)
        return step_result(seen, balanced, combination, overhead)

    def reset_accumulation(self) -> None:
        """Drop the micro-batches recorded by ``backward(..., accumulate=True)`` since the last balanced step."""
        self._micro_batches.clear()

    def _global_losses(self, losses: Tensor, shared: Sequence[Tensor], ranks: Ranks | None) -> tuple[Tensor, Tensor]:
        """(the values to check, the losses the loss method sees): this process's, or the global batch's.

        On a process group the values are every rank's (R × K) and the loss method sees their mean in rank order
        through ``L_r - L_r.detach() + L``: exactly L, with the gradient of the rank's own graph.
        """
        if ranks is None:
            return losses.detach(), losses
        self._align(ranks)
        gathered = ranks.gather_losses(losses, signature(shared, _other_leaves(losses, shared)))
        mean = Ranks.mean_of(gathered, losses)
        return gathered, (losses - losses.detach()) + mean

    def _values_usable(self, values: Tensor, scaler: GradScaler | None) -> bool:
        """Refuse loss values the methods cannot take; False (skip the step) for a non-finite one with a scaler."""
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            if scaler is not None:
                return False
            if self.check_finite:
                raise ValueError(f"non-finite loss (NaN or Inf) for {_where(~finite)}: {values.tolist()}")
        if self.loss.takes_log and not bool((values > 0).all()):
            raise ValueError(
                f"{type(self.loss).__name__} takes log L_k, but {_where(values <= 0)} have loss <= 0: "
                f"{values.tolist()}. Use strictly positive losses (e.g. add a small constant)."
            )
        return True

    def _align(self, ranks: Ranks) -> None:
        """On the first step on a process group: the same balancer on every rank, with rank 0's state."""
        if not self._aligned:
            ranks.align(self, self._identity_on_ranks())
            self._aligned = True

    def _identity_on_ranks(self) -> str:
        """What must be the same on every rank: K, the settings, each method's class and options (not its seed,
        which the state carries: rank 0's is taken)."""
        methods = [
            f"{name or 'balancer'}={type(module).__name__}({_options_text(module._identity())})"
            for name, module in self.named_modules()
            if isinstance(module, Declared)
        ]
        return f"{self.extra_repr()}, distributed={self.distributed!r}; " + "; ".join(methods)

    def _skip(self, losses: Tensor, shared: Sequence[Tensor], seen: Tensor, scaler: GradScaler | None) -> BalanceResult:
        """A step the scaler skips: Inf into ``θ.grad`` (``scaler.unscale_`` finds it), nothing else changed."""
        assert scaler is not None
        scaler.scale(losses.detach().sum())  # the scaler's scale exists for unscale_, even on a first step
        accumulate_grads(shared, [torch.full_like(p, float("inf")) for p in shared], owned=True)
        nan = torch.full_like(seen.detach(), float("nan"))
        return BalanceResult(
            weights=nan,
            losses=seen.detach(),
            balanced_losses=nan,
            loss_weights=nan,
            gradient_weights=None,
            overhead_s=0.0,
            converged=False,
            note="skipped: a loss or gradient is non-finite (the GradScaler skips the update and lowers its scale)",
            skipped=True,
        )

    def _accumulated(
        self,
        losses: Tensor,
        shared: list[Tensor],
        features: Tensor | None,
        scaler: GradScaler | None,
        ranks: Ranks | None,
        start: float,
        last: bool,
    ) -> BalanceResult | None:
        """A micro-batch of exact gradient accumulation: record it, or (``last``) balance all of them as one."""
        micro = self._micro_batches
        heads = _other_leaves(losses, shared)
        inputs = [*shared, *heads]
        micro.check_inputs(inputs)
        self._engine.check(losses, shared, self.gradient, features, StepContext(ranks=ranks))
        represent = self._engine.path == "representation"
        values = losses.detach()
        if not bool(torch.isfinite(values).all()) and scaler is not None and not last:
            micro.record(values, [p.new_zeros((self.n_tasks, *p.shape)) for p in inputs], inputs, False)
            return None
        if not last:
            self._values_usable(values, None)
        scale = _scale_of(scaler, losses)
        context = StepContext(scale, ranks)
        scaled = context.scaled(losses)
        feature_rows = None
        if represent:
            assert features is not None  # the engine's check requires them
            feature_rows = self._engine.feature_rows(scaled, features) / scale
        blocks = [b if scale == 1.0 else b / scale for b in self._engine.raw_jacobian(scaled, inputs)]
        finite = self._blocks_finite(blocks, scaler is not None or ranks is not None)
        if not last:
            micro.record(losses, blocks, inputs, finite, feature_rows)
            return None
        mean, total, represented = micro.totals(losses, blocks, feature_rows)
        finite = finite and micro.finite and bool(torch.isfinite(values).all())
        if ranks is not None:
            self._align(ranks)
            gathered = ranks.gather_losses(mean, signature(shared, heads))
            mean = Ranks.mean_of(gathered, losses)
            if ranks.exact:
                total = ranks.mean(total)
            finite = ranks.all_true(finite)
        if not finite:
            micro.clear()
            if scaler is None:
                raise NonFiniteGradientError(
                    "a per-task gradient of an accumulated micro-batch is non-finite (NaN or Inf) although the "
                    "losses are finite, on this or another rank; the pending micro-batches were dropped"
                )
            return self._skip(losses, shared, mean, scaler)
        self._values_usable(mean, None)
        with atomic(self):
            leaf = mean.detach().clone().requires_grad_(True)
            balanced = self.loss(leaf)
            before_engine = time.perf_counter()
            chain = loss_jacobian(balanced.losses, leaf)  # D = ∂ℓ̃/∂L
            own = [t for t in reachable_leaves(balanced.losses) if t is not leaf]
            own_grads = summed_gradient(balanced.losses, own)
            shared_blocks, head_grads = chained(chain, total, len(shared), context.scale)
            own_grads = [None if g is None else context.scaled(g) for g in own_grads]
            combination = self._engine.step_blocks(
                context.scaled(balanced.losses.detach()),
                shared,
                shared_blocks,
                [*heads, *own],
                [*head_grads, *own_grads],
                self.gradient,
                context,
                None if represented is None else context.scaled(chain.to(represented.dtype) @ represented),
            )
        micro.clear()
        overhead = time.perf_counter() - (start if combination is not None else before_engine)
        self._warn_unconverged(combination)
        return step_result(mean, balanced, combination, overhead)

    def _blocks_finite(self, blocks: Sequence[Tensor], skip: bool) -> bool:
        """Whether a micro-batch's per-task gradients are finite; raises when they are not (unless ``skip``)."""
        if not (self.check_finite or skip):
            return True
        norms = torch.stack([b.reshape(self.n_tasks, -1).norm(dim=1) for b in blocks]).norm(dim=0)
        try:
            require_finite(norms)
        except NonFiniteGradientError:
            if skip:
                return False
            raise
        return True

    def end_epoch(self) -> None:
        """Call once at the end of every training epoch (DWA, IGBv1's baseline, IGBv2's schedule use it)."""
        with atomic(self):
            self.loss.end_epoch()

    def after_step(self, losses: Tensor | Iterable[Tensor]) -> None:
        """Call after ``optimizer.step()`` with the same batch's losses under the updated model (FAMO).

        A no-op for every other method, so a training loop may always call it.
        """
        checked = self._check_losses(losses, need_grad=False).detach()
        ranks = Ranks.of(self.distributed, self.group)
        values = checked if ranks is None else ranks.gather_losses(checked, NO_SIGNATURE)
        self._values_usable(values, None)
        seen = checked if ranks is None else Ranks.mean_of(values, checked)
        with atomic(self):
            self.loss.after_step(seen)

    def reset(self) -> None:
        """Forget all history of both methods (and re-initialise their parameters), and pending micro-batches."""
        self.loss.reset()
        self.gradient.reset()
        self._engine.reset()
        self._micro_batches.clear()
        self._warned_solver = False
        self._aligned = False

    def _warn_unconverged(self, combination: Combination | None) -> None:
        if combination is not None and not combination.converged and not self._warned_solver:
            self._warned_solver = True
            warnings.warn(
                f"{type(self.gradient).__name__}: {combination.note or 'solver did not converge'} "
                "(reported in BalanceResult.converged; warned once)",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- validation ------------------------------------------------------------------------------------------
    def _check_losses(self, losses: Tensor | Iterable[Tensor], need_grad: bool = True) -> Tensor:
        if not isinstance(losses, Tensor):
            items = list(losses)
            if not all(isinstance(x, Tensor) and x.numel() == 1 for x in items):
                raise TypeError("losses must be a tensor of shape (K,) or a sequence of K scalar tensors")
            losses = torch.stack([x.reshape(()) for x in items])
        if losses.dim() != 1 or losses.shape[0] != self.n_tasks:
            raise ValueError(
                f"losses must have shape ({self.n_tasks},) (one scalar per task), got {tuple(losses.shape)}"
            )
        if not losses.is_floating_point():
            raise TypeError(f"losses must be floating point, got {losses.dtype}")
        if need_grad and not losses.requires_grad:
            raise ValueError("losses do not require grad: compute them from the model's outputs")
        if losses.dtype in (torch.float16, torch.bfloat16):  # from autocast: the methods work in float32
            losses = losses.float()
        return losses

    def _check_shared(self, shared_params: Iterable[Tensor], losses: Tensor) -> list[Tensor]:
        if isinstance(shared_params, Tensor):
            shared_params = [shared_params]
        shared = list(shared_params)
        if not shared:
            raise ValueError("shared_params is empty: pass the shared (encoder) parameters")
        frozen = [i for i, p in enumerate(shared) if not p.requires_grad]
        if frozen:
            raise ValueError(f"shared parameters at positions {frozen} do not require grad")
        repeated = _sharing_memory(shared)
        if repeated:
            groups = "; ".join(str(group) for group in repeated)
            raise ValueError(
                f"shared parameters at positions {groups} are the same tensor (or share memory): list each shared "
                "parameter once (e.g. model.encoder.parameters(), which yields a tied weight once)"
            )
        leaf_ids = {id(t) for t in reachable_leaves(losses)}
        unused = [i for i, p in enumerate(shared) if id(p) not in leaf_ids]
        if unused:
            raise ValueError(
                f"shared parameters at positions {unused} have no gradient path from the losses; pass only "
                "parameters the losses depend on (e.g. model.encoder.parameters())"
            )
        return shared

    # -- state -----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, **self._engine.reuse.state(), **self._engine.tuner.state()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "n_tasks" not in state:
            raise ValueError("not a saved Balancer state: it does not say its number of tasks")
        if state["n_tasks"] != self.n_tasks:
            raise ValueError(f"state is for {state['n_tasks']} tasks, this Balancer has {self.n_tasks}")
        self._engine.reuse.load(state)
        self._engine.tuner.load(state)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all or nothing: a state refused anywhere (by a method, for K, for missing
        or unexpected keys) leaves the Balancer exactly as it was, its own counters included."""
        with atomic(self):
            return super().load_state_dict(state_dict, strict, assign)

    def extra_repr(self) -> str:
        every = f", update_weights_every={self.update_weights_every}" if self.update_weights_every > 1 else ""
        return f"n_tasks={self.n_tasks}, engine={self.engine!r}{every}"


@contextlib.contextmanager
def _compiled_backward_advice() -> Iterator[None]:
    """Say what to do when a compiled model's backward cannot be run more than once (donated buffers)."""
    try:
        yield
    except RuntimeError as error:
        if "donated buffer" not in str(error):
            raise
        raise RuntimeError(
            "the model's backward was compiled by torch.compile with donated buffers, which allow one backward pass "
            "only; the balancer takes one per task. Set torch._functorch.config.donated_buffer = False before "
            "compiling (see the README's torch.compile paragraph). Nothing was changed."
        ) from error


def _autocast_off() -> contextlib.ExitStack:
    """A context that turns off every autocast region that is on (the CPU's and accelerators')."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda", "xpu", "mps"):
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except (TypeError, RuntimeError):  # torch < 2.4 takes no device type; a device type this build lacks
            continue
        if enabled:
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in options.items())


def _other_leaves(losses: Tensor, shared: Sequence[Tensor]) -> list[Tensor]:
    """The leaves the losses reach besides the shared parameters (the heads): what the ranks compare, and what a
    micro-batch records beside θ."""
    shared_ids = {id(p) for p in shared}
    return [t for t in reachable_leaves(losses) if id(t) not in shared_ids]


def _where(mask: Tensor) -> str:
    """Which tasks (and, for values gathered from every rank, which ranks) ``mask`` marks."""
    if mask.dim() == 1:
        return f"task(s) {torch.nonzero(mask).flatten().tolist()}"
    tasks = torch.nonzero(mask.any(dim=0)).flatten().tolist()
    return f"task(s) {tasks} on rank(s) {torch.nonzero(mask.any(dim=1)).flatten().tolist()}"


def _scale_of(scaler: GradScaler | None, like: Tensor) -> float:
    """The scaler's current scale s (1.0 without one, or when it is disabled), created on ``like``'s device if
    this is its first use (``scaler.scale`` makes it, and ``unscale_`` needs it)."""
    if scaler is None:
        return 1.0
    scaler.scale(like.detach().sum())
    return float(scaler.get_scale())


def _sharing_memory(tensors: list[Tensor]) -> list[list[int]]:
    """Groups (≥ 2) of positions whose tensors overlap in memory: one tensor listed twice, or views of one.

    Disjoint views of one buffer (parameters carved out of a flat buffer) do not overlap and are not grouped.
    """
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0 or t.device.type == "meta":
            continue
        start = t.data_ptr()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        spans.append((str(t.device), start, start + extent * t.element_size(), i))
    spans.sort()
    groups: list[list[int]] = []
    end, device = -1, ""
    for dev, start, stop, i in spans:
        if dev == device and start < end:
            groups[-1].append(i)
            end = max(end, stop)
        else:
            groups.append([i])
            end, device = stop, dev
    return [sorted(group) for group in groups if len(group) > 1]
