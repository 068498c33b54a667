"""Soft Actor-Critic with a pluggable squashing map: one agent for control benchmarks and for IGBv2.

Haarnoja, Zhou, Abbeel, Levine, "Soft Actor-Critic" (ICML 2018, arXiv 1801.01290), with the twin critics,
target critics and automatic temperature of Haarnoja et al., "Soft Actor-Critic Algorithms and Applications"
(arXiv 1812.05905). One :meth:`SAC.update` on a minibatch (s, a, r, s', d) does, in this order:

    y      = r + γ (1 − d) (min_i Q̄_i(s', a') − α log π(a'|s')),   a' ~ π(·|s')           (no gradient)
    critic : minimise Σ_i mean (Q_i(s, a) − y)²
    actor  : minimise mean (α log π(ã|s) − min_i Q_i(s, ã)),      ã ~ π(·|s) reparameterised
    α      : minimise −mean log α · (log π(ã|s) + H̄)               (α grows when the entropy is below H̄)
    target : θ̄ ← τ θ + (1 − τ) θ̄

The actor and the α step use the α from before this update, the actor step the critics after theirs, as the
reference code does. Actions are a = squash(u), u ~ N(μ(s), σ(s)); log π is the density of a
(see :mod:`taskbalance.rl.squash`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method import Declared, fields
from .networks import GaussianActor, TwinCritic
from .replay import ReplayBuffer
from .squash import Squash

#: devices with a fused Adam kernel (``torch.optim.Adam(fused=True)``) for every floating dtype they hold
_FUSED_ADAM_DEVICES = ("cpu", "cuda", "xpu", "mps")


class UpdateInfo(NamedTuple):
    """Diagnostics of one update, as detached device tensors (reading them synchronises; nothing else does)."""

    critic_loss: Tensor
    actor_loss: Tensor
    alpha_loss: Tensor | None
    #: α used by this update (before its own α step)
    alpha: Tensor
    #: mean log π(ã|s) over the batch: minus the policy-entropy estimate the α step compares with H̄
    log_prob: Tensor


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_options(hidden: Sequence[int], gamma: float, tau: float, lrs: Sequence[float], init_alpha: float) -> None:
    """Raise ValueError, with the accepted range, for a bad SAC size or rate (shared with IGBv2's early check)."""
    for width in hidden:
        _positive_int("each hidden width", width)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning rates must be positive finite numbers, got {lr}")
    if not (math.isfinite(init_alpha) and init_alpha > 0):
        raise ValueError(f"init_alpha must be a positive finite number, got {init_alpha}")


class SAC(Declared):
    """A small Soft Actor-Critic agent: Gaussian actor, twin critics with Polyak targets, learned temperature.

    Everything it needs to continue a run bit-identically lives in ``state_dict()``: the networks and target
    networks, log α, the replay buffer (module buffers), and as extra state the three Adam states, the
    generator state and the update counter. All randomness (initialisation, action noise, minibatch indices)
    comes from one CPU ``torch.Generator`` seeded with ``seed``; draws are moved to the agent's device, so a
    seed gives the same random stream on every device. ``.to(device)`` moves networks, buffer and optimizer
    states together.

    Args:
        state_dim, action_dim: sizes of s and a.
        squash: the map u ↦ a with its log-density (:class:`TanhSquash`, :class:`SoftmaxSquash`).
        hidden: hidden layer widths of the actor and of each critic (default 128, 128).
        gamma: discount γ ∈ [0, 1] (0.99).
        tau: Polyak rate τ ∈ (0, 1] of the target critics (0.005).
        actor_lr, critic_lr, alpha_lr: Adam learning rates (3e-4 each).
        init_alpha: initial temperature α > 0 (0.2).
        learn_alpha: tune α toward ``target_entropy`` (True); otherwise α stays ``init_alpha``.
        target_entropy: H̄, default −action_dim.
        buffer_size: replay capacity (10,000).
        log_std_bounds: clamp of the actor's log σ ((−20, 2)).
        seed: seed of the agent's generator; None draws one from torch's global RNG once, at construction.
    """

    options = (
        "state_dim",
        "action_dim",
        "hidden",
        "gamma",
        "tau",
        "lrs",
        "init_alpha",
        "learn_alpha",
        "target_entropy",
        "seed",
    )
    state = fields("seed", "generator", "n_updates", "_optimizers")
    log_alpha: nn.Parameter

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        squash: Squash,
        *,
        hidden: Sequence[int] = (128, 128),
        gamma: float = 0.99,
        tau: float = 0.005,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        alpha_lr: float = 3e-4,
        init_alpha: float = 0.2,
        learn_alpha: bool = True,
        target_entropy: float | None = None,
        buffer_size: int = 10_000,
        log_std_bounds: tuple[float, float] = (-20.0, 2.0),
        seed: int | None = None,
    ) -> None:
        super().__init__()
        _positive_int("state_dim", state_dim)
        _positive_int("action_dim", action_dim)
        _positive_int("buffer_size", buffer_size)
        if not isinstance(squash, Squash):
            raise TypeError(f"squash must be a taskbalance.rl.Squash, got {type(squash).__name__}")
        check_options(hidden, gamma, tau, (actor_lr, critic_lr, alpha_lr), init_alpha)
        if target_entropy is not None and not math.isfinite(target_entropy):
            raise ValueError(f"target_entropy must be finite or None, got {target_entropy}")
        if not log_std_bounds[0] < log_std_bounds[1]:
            raise ValueError(f"log_std_bounds must be (low, high) with low < high, got {log_std_bounds}")
        self.state_dim = state_dim
        self.action_dim = action_dim
        self.hidden = tuple(hidden)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.lrs = (float(actor_lr), float(critic_lr), float(alpha_lr))
        self.init_alpha = float(init_alpha)
        self.learn_alpha = learn_alpha
        self.target_entropy = float(-action_dim if target_entropy is None else target_entropy)
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)

        self.squash = squash
        self.actor = GaussianActor(state_dim, action_dim, self.hidden, log_std_bounds)
        self.critic = TwinCritic(state_dim, action_dim, self.hidden)
        self.critic_target = TwinCritic(state_dim, action_dim, self.hidden)
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        # the dtype the initial values are drawn in: reset() after .double() must give the float32 build, moved
        self._built_dtype = self.log_alpha.dtype
        self.buffer = ReplayBuffer(buffer_size, state_dim, action_dim)
        self.generator = torch.Generator()
        self.n_updates = 0
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the freshly constructed agent (same seed) as moved to the current device and dtype.

        Initial values are rounded to the dtype the agent was built in before they are cast to the current one:
        an agent built in float32 and moved to float64 resets to its float32 start, not to float64 draws.
        """
        self.generator.manual_seed(self.seed)
        self.actor.reset_parameters(self.generator, self._built_dtype)
        self.critic.reset_parameters(self.generator, self._built_dtype)
        self.critic_target.load_state_dict(self.critic.state_dict())
        with torch.no_grad():
            self.log_alpha.fill_(torch.tensor(math.log(self.init_alpha), dtype=self._built_dtype))
        self.buffer.clear()
        self._build_optimizers()
        self.n_updates = 0

    def _build_optimizers(self) -> None:
        # The parameter lists are cached for the update and the Polyak step (module traversal costs per call);
        # .to() keeps the Parameter objects (it swaps their data), and this runs again after every move anyway.
        self._actor_params: list[Tensor] = list(self.actor.parameters())
        self._critic_params: list[Tensor] = list(self.critic.parameters())
        self._target_params: list[Tensor] = list(self.critic_target.parameters())
        actor_lr, critic_lr, alpha_lr = self.lrs
        fused, foreach = self._adam_kernel()
        self.actor_optimizer = torch.optim.Adam(self._actor_params, lr=actor_lr, fused=fused, foreach=foreach)
        self.critic_optimizer = torch.optim.Adam(self._critic_params, lr=critic_lr, fused=fused, foreach=foreach)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=alpha_lr, fused=fused, foreach=foreach)

    def _adam_kernel(self) -> tuple[bool | None, bool | None]:
        """Adam's (``fused``, ``foreach``): the fused kernel (one call over all parameters) where torch has one.

        The per-parameter Adam math is the same whichever kernel runs; PyTorch's default on the CPU is a Python
        loop over parameters, several times slower for these 8–12 small tensors. Fused Adam rounds differently
        from the loop (within float tolerance); foreach, the fallback, matches the loop bit for bit.
        """
        if self.log_alpha.device.type in _FUSED_ADAM_DEVICES:
            return True, None
        return None, True

    @property
    def _optimizers(self) -> dict[str, Any]:
        """The three Adam states by name; assigning loads them, keeping this agent's kernel choice.

        ``Optimizer.load_state_dict`` takes the saved param-group flags (``fused``, ``foreach``) as they were:
        a checkpoint from before the multi-tensor kernels, or from another device, would otherwise bring back
        its own. The flags change how the step is computed, not what Adam state is kept.
        """
        return {name: opt.state_dict() for name, opt in self._named_optimizers()}

    @_optimizers.setter
    def _optimizers(self, saved: dict[str, Any]) -> None:
        fused, foreach = self._adam_kernel()
        for name, opt in self._named_optimizers():
            state = saved[name]
            groups = [{**group, "fused": fused, "foreach": foreach} for group in state["param_groups"]]
            opt.load_state_dict({**state, "param_groups": groups})

    def _named_optimizers(self) -> Iterator[tuple[str, torch.optim.Optimizer]]:
        yield "actor", self.actor_optimizer
        yield "critic", self.critic_optimizer
        yield "alpha", self.alpha_optimizer

    def _apply(self, fn: Any, recurse: bool = True) -> SAC:
        # .to()/.double() move parameters; Adam's moment tensors must follow them. Re-building the optimizers
        # and loading their old state casts it to the parameters' new device and dtype.
        saved = self._optimizers if "actor_optimizer" in vars(self) else {}
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if saved:
            self._build_optimizers()
            self._optimizers = saved
        return self

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.log_alpha.device

    @property
    def dtype(self) -> torch.dtype:
        return self.log_alpha.dtype

    @property
    def alpha(self) -> Tensor:
        """The current temperature α = exp(log α), detached."""
        return self.log_alpha.detach().exp()

    # -- acting ----------------------------------------------------------------------------------------------
    def _noise(self, like: Tensor) -> Tensor:
        """Standard normal noise shaped like ``like``, drawn on the CPU from the agent's generator."""
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)

    def policy(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterised sample a ~ π(·|s) and log π(a|s) (differentiable w.r.t. the actor)."""
        mean, log_std = self.actor(state)
        return self.squash.sample(mean, log_std, self._noise(mean))

    @torch.no_grad()
    def act(self, state: Tensor, deterministic: bool = False) -> Tensor:
        """The action for ``state`` ((S,) or (B, S)): a sample of π, or squash(μ) when ``deterministic``."""
        state = state.to(device=self.device, dtype=self.dtype)
        mean, log_std = self.actor(state)
        u = mean if deterministic else mean + log_std.exp() * self._noise(mean)
        action: Tensor = self.squash(u)
        return action

    def store(
        self, state: Tensor, action: Tensor, reward: Tensor | float, next_state: Tensor, done: Tensor | float = 0.0
    ) -> None:
        """Add one transition to the replay buffer."""
        self.buffer.add(state, action, reward, next_state, done)

    # -- learning --------------------------------------------------------------------------------------------
    def td_target(self, reward: Tensor, next_state: Tensor, done: Tensor) -> Tensor:
        """y = r + γ (1 − d) (min_i Q̄_i(s', a') − α log π(a'|s')) with a fresh a' ~ π(·|s')."""
        return self._td_target(reward, next_state, done, self.alpha)

    @torch.no_grad()
    def _td_target(self, reward: Tensor, next_state: Tensor, done: Tensor, alpha: Tensor) -> Tensor:
        next_action, next_log_prob = self.policy(next_state)
        q1, q2 = self.critic_target(next_state, next_action)
        soft_value = torch.min(q1, q2).sub_(alpha * next_log_prob)
        return torch.addcmul(reward, 1.0 - done, soft_value, value=self.gamma)

    def update(self, batch_size: int) -> UpdateInfo:
        """One SAC gradient update of critics, actor, α and the target critics on a sampled minibatch."""
        batch = self.buffer.sample(batch_size, self.generator)
        alpha = self.alpha
        target = self._td_target(batch.reward, batch.next_state, batch.done, alpha)

        q1, q2 = self.critic(batch.state, batch.action)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.critic_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(critic_loss)
        self.critic_optimizer.step()

        action, log_prob = self.policy(batch.state)
        q1_pi, q2_pi = self.critic(batch.state, action)
        actor_loss = (alpha * log_prob - torch.min(q1_pi, q2_pi)).mean()
        # The actor and α losses share no parameter (α's sees log π detached, the actor's the α from before this
        # update): one backward pass gives each its own gradient. inputs=: the critics' .grad stays untouched.
        self.actor_optimizer.zero_grad(set_to_none=True)
        alpha_loss = None
        if self.learn_alpha:
            alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
            self.alpha_optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward((actor_loss, alpha_loss), inputs=[*self._actor_params, self.log_alpha])
            self.alpha_optimizer.step()
        else:
            torch.autograd.backward(actor_loss, inputs=self._actor_params)
        self.actor_optimizer.step()

        self.soft_update()
        self.n_updates += 1
        return UpdateInfo(
            critic_loss=critic_loss.detach(),
            actor_loss=actor_loss.detach(),
            alpha_loss=None if alpha_loss is None else alpha_loss.detach(),
            alpha=alpha,
            log_prob=log_prob.detach().mean(),
        )

    @torch.no_grad()
    def soft_update(self) -> None:
        """Polyak averaging of the target critics: θ̄ ← τ θ + (1 − τ) θ̄."""
        torch._foreach_lerp_(self._target_params, self._critic_params, self.tau)
