"""IGBv2: improvable gap balancing with deep reinforcement learning (a SAC agent picks the task weights).

Task weighting as a continuing decision problem: the state is the batch's K raw losses (or, as an option, their
logs or their ratios to the baseline), the action the K task weights, the reward how much the worst task's
improvable gap shrank since the previous iteration. The agent is :class:`taskbalance.rl.SAC` with a softmax
squashing map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ..method import fields
from ..rl import SAC, SoftmaxSquash
from ..rl.sac import check_options
from .base import Balanced, LossBalancer, log_losses, random_softmax_weights
from .baseline import EpochMeanBaseline

Observation = Literal["raw", "log", "baseline"]


def _int_at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class IGBv2(LossBalancer):
    """ℓ̃_k = a_k · log L_k, with a = K·softmax(u), u ~ N(μ(s), σ(s)) from a SAC actor fed s = L (detached, or
    log L or L/L̄: ``observation``).

    Reward of the transition (s_{t−1}, a_{t−1}) → s_t:
        r_t = reward_scale · min_k (L_k(t−1) − L_k(t)) / L̄_k,
    L̄ the IGBv1 baseline (mean raw loss of epoch ``base_epoch``); no terminal state, γ = 0.99.

    Schedule (0-based epochs counted by :meth:`end_epoch`, t = global iteration from 0), each iteration:
      1. from the first iteration after the baseline is recorded (epoch base_epoch + 1): store the transition;
      2. from epoch ``train_epoch`` on, when t % ``update_every`` = 0: with k = 1 + |buffer|/capacity ∈ [1, 2],
         run int(update_every·k/2) SAC updates on minibatches of int(batch_size·k/2) transitions;
      3. weights: K·softmax(randn(K)) before epoch ``policy_epoch`` (RLW on log losses), a stochastic action of
         the policy from then on.
    Both the update count and the minibatch grow as the buffer fills; once it is full this is one SAC update
    per iteration on average.

    Agent (paper and reference defaults): actor K→128→128 (ReLU) with linear heads μ, log σ (clamped to
    [−20, 2]); twin critics (state ⊕ weights) 2K→128→128→1 with Polyak targets (τ = 0.005); Adam lr 3e-4 for
    actor, critics and log α; α from 0.2, tuned toward entropy −K; FIFO replay of 10,000 transitions. The
    critics see the weights a (as the reference does), not the Gaussian sample u.

    Paper: Dai, Fei, Lu, "Improvable Gap Balancing for Multi-Task Learning" (UAI 2023, arXiv 2307.15429).

    Args:
        base_epoch: epoch of the baseline L̄ (1). train_epoch: first epoch with SAC updates (3).
            policy_epoch: first epoch whose weights come from the policy (5). Need base_epoch < train_epoch
            <= policy_epoch, so the buffer is never empty when training starts.
        update_every: iterations between training calls, and the update count per call at a full buffer (50).
        batch_size: minibatch size at a full buffer (256). buffer_size: replay capacity (10,000).
        hidden, lr, gamma, tau, init_alpha: SAC sizes and rates ((128, 128), 3e-4, 0.99, 0.005, 0.2).
        reward_scale: factor of the reward (1.0). The reference sets it to initial_lr / current_lr at the start
            of every NYUv2 epoch, so that the smaller loss declines at a lower learning rate still pay; assign
            :attr:`reward_scale` between epochs to do the same.
        log_prob: ``"simplex"`` (default) the density of the weights on the simplex; ``"reference"`` the
            reference code's formula (see :class:`~taskbalance.rl.SoftmaxSquash`).
        observation: the state s the agent sees: ``"raw"`` (default, the paper's and reference's) s = L;
            ``"log"`` s = log L; ``"baseline"`` s = L / L̄ (the transitions, stored only once L̄ exists, all see
            it). The reward is the same in all three. See "Losses of very different scales" below.
        seed: seed of the method's generator (random weights) from which the agent's seed is drawn; None draws
            one from torch's global RNG once, at construction.

    Differences from the reference code (IGB4MTL), and why:
      - log π: the reference subtracts tanh's log-derivative although the weights come from a softmax, so
        the entropy its α is tuned on is not the weights' entropy; we default to the correct density and keep
        the reference formula as ``log_prob="reference"``.
      - the reference finds epochs by comparing its global step with N·epoch (it must be told N); we count
        epochs through :meth:`end_epoch`. Same schedule when every epoch has N iterations, and still right when
        they do not.
      - randomness comes from generators the method owns (the reference draws from the global RNG), and the
        replay buffer lives on the agent's device (the reference stages it on the CPU), so a step does no host
        synchronisation.

    Losses of very different scales: the state goes into the networks as it is, so raw losses spanning 1e-6..1e6
    put inputs of 1e6 into the actor and the critics. Q-values, their gradients and the critics' Adam moments
    grow with them (second moments 5e17–7e21) and the actor's μ saturates: with losses scaled by 1e-6, 1, 1e6
    (TinyMTL-sized model, policy from epoch 3, 1,200 steps) one task gets > 99.9% of the weight in 93–97% of the
    last 500 steps (3 seeds), a different task from step to step; with unit scales, in none (2 seeds, moments
    < 0.2). This is the paper's state meeting a scale its benchmarks never had (O(1) losses), not an error in
    the update. Remedy: ``observation="log"`` (scale-free up to a shift, for any positive losses) or
    ``"baseline"`` (O(1) once the baseline exists): the same runs saturate in none of the last 500 steps,
    second moments < 0.5 (log) and < 0.005 (baseline). Either changes the method, hence not the default.

    The agent's networks are not registered submodules, so ``Balancer.parameters()`` does not yield them and a
    model optimizer cannot step them a second time: they have their own optimizers. They still follow
    ``balancer.to(...)``, move to the losses' device on first use, and are saved in ``state_dict()``.
    """

    takes_log = True
    options = (
        "base_epoch",
        "train_epoch",
        "policy_epoch",
        "update_every",
        "batch_size",
        "buffer_size",
        "hidden",
        "lr",
        "gamma",
        "tau",
        "init_alpha",
        "initial_reward_scale",
        "log_prob",
        "observation",
        "seed",
    )
    state = fields(
        "seed", "reward_scale", "_generator", "_baseline", "_agent", step=0, _prev_state=None, _prev_action=None
    )
    _agent: SAC | None
    step: int  # iterations so far (global t)
    _prev_state: Tensor | None  # the last step's raw losses and action, until the next step stores the transition
    _prev_action: Tensor | None

    def __init__(
        self,
        *,
        base_epoch: int = 1,
        train_epoch: int = 3,
        policy_epoch: int = 5,
        update_every: int = 50,
        batch_size: int = 256,
        buffer_size: int = 10_000,
        hidden: Sequence[int] = (128, 128),
        lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        init_alpha: float = 0.2,
        reward_scale: float = 1.0,
        log_prob: Literal["simplex", "reference"] = "simplex",
        observation: Observation = "raw",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        _int_at_least("base_epoch", base_epoch, 0)
        _int_at_least("train_epoch", train_epoch, base_epoch + 1)
        _int_at_least("policy_epoch", policy_epoch, train_epoch)
        # the per-call count and minibatch are int(x · k/2) with k/2 ≥ 1/2: both must stay ≥ 1
        _int_at_least("update_every", update_every, 2)
        _int_at_least("batch_size", batch_size, 2)
        _int_at_least("buffer_size", buffer_size, 1)
        if log_prob not in ("simplex", "reference"):
            raise ValueError(f"log_prob must be 'simplex' or 'reference', got {log_prob!r}")
        if observation not in ("raw", "log", "baseline"):
            raise ValueError(f"observation must be 'raw', 'log' or 'baseline', got {observation!r}")
        self.base_epoch = base_epoch
        self.train_epoch = train_epoch
        self.policy_epoch = policy_epoch
        self.update_every = update_every
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.log_prob = log_prob
        self.observation: Observation = observation
        check_options(hidden, gamma, tau, (lr,), init_alpha)
        self.hidden = tuple(hidden)
        self.lr = lr
        self.gamma = gamma
        self.tau = tau
        self.init_alpha = init_alpha
        self.initial_reward_scale = self._check_reward_scale(reward_scale)
        self._reward_scale = self.initial_reward_scale
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self._generator = torch.Generator()
        self._baseline = EpochMeanBaseline(base_epoch)
        # Held outside the module tree (object.__setattr__ skips nn.Module's registration) so that the agent's
        # parameters never reach the model's optimizer through Balancer.parameters().
        object.__setattr__(self, "_agent", None)

    # -- the agent and options -------------------------------------------------------------------------------
    @property
    def agent(self) -> SAC:
        """The SAC agent (exists once the method is set up by a Balancer)."""
        agent: SAC | None = self._agent
        if agent is None:
            raise RuntimeError("IGBv2 is not set up: wrap it in taskbalance.Balancer")
        return agent

    @property
    def epoch(self) -> int:
        """The current epoch, 0-based (the number of :meth:`end_epoch` calls so far)."""
        return self._baseline.epoch

    @staticmethod
    def _check_reward_scale(value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"reward_scale must be a positive finite number, got {value}")
        return float(value)

    @property
    def reward_scale(self) -> float:
        return self._reward_scale

    @reward_scale.setter
    def reward_scale(self, value: float) -> None:
        self._reward_scale = self._check_reward_scale(value)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._generator.manual_seed(self.seed)
        self._baseline.reset()
        self._reward_scale = self.initial_reward_scale
        if self.n_tasks == 0:
            return
        agent_seed = int(torch.randint(0, 2**62, (1,), generator=self._generator).item())
        if self._agent is None:
            squash = SoftmaxSquash(float(self.n_tasks), density=self.log_prob)
            shared: dict[str, Any] = {name: getattr(self, name) for name in ("hidden", "gamma", "tau", "init_alpha")}
            shared.update(dict.fromkeys(("actor_lr", "critic_lr", "alpha_lr"), self.lr))
            agent = SAC(self.n_tasks, self.n_tasks, squash, buffer_size=self.buffer_size, seed=agent_seed, **shared)
            object.__setattr__(self, "_agent", agent)
        else:
            self._agent.seed = agent_seed
            self._agent.reset()

    def _apply(self, fn: Any, recurse: bool = True) -> IGBv2:
        # .to()/.double() reach the Balancer's submodules only; carry them on to the unregistered agent.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self._agent is not None:
            self._agent._apply(fn, recurse)
        if self._prev_state is not None and self._prev_action is not None:
            self._prev_state, self._prev_action = fn(self._prev_state), fn(self._prev_action)
        return self

    def end_epoch(self) -> None:
        self._baseline.end_epoch()

    # -- the step --------------------------------------------------------------------------------------------
    def balance(self, losses: Tensor) -> Balanced:
        agent = self.agent
        if agent.device != losses.device:
            agent.to(losses.device)  # once, when the losses first arrive on another device
            if self._prev_state is not None and self._prev_action is not None:
                self._prev_state = self._prev_state.to(losses.device)
                self._prev_action = self._prev_action.to(losses.device)
        raw = losses.detach().to(dtype=agent.dtype, copy=True)
        self._baseline.observe(losses)

        baseline = self._baseline.value
        if baseline is not None:
            baseline = baseline.to(device=raw.device, dtype=raw.dtype)
            if self._prev_state is not None and self._prev_action is not None:
                reward = self._reward_scale * ((self._prev_state - raw) / baseline).min()
                previous = self._observe(self._prev_state, baseline)
                agent.store(previous, self._prev_action, reward, self._observe(raw, baseline))

        if self.epoch >= self.train_epoch and self.step % self.update_every == 0:
            self._train(agent)

        if self.epoch < self.policy_epoch:
            weights = random_softmax_weights(self.n_tasks, self._generator, like=losses)
            action = weights.to(agent.dtype)
        else:
            action = agent.act(self._observe(raw, baseline))
            weights = action.to(losses.dtype)
        self._prev_state, self._prev_action = raw, action
        self.step += 1
        return Balanced(losses=weights * log_losses(losses), weights=weights)

    def _observe(self, raw: Tensor, baseline: Tensor | None) -> Tensor:
        """The agent's state for the raw losses ``raw``: raw itself, log raw, or raw / L̄ (raw until L̄ exists)."""
        if self.observation == "log":
            return raw.log()
        if self.observation == "baseline" and baseline is not None:
            return raw / baseline
        return raw

    def _train(self, agent: SAC) -> None:
        """One training call: the update count and the minibatch grow with the buffer's fill (as the reference)."""
        k = 1 + len(agent.buffer) / agent.buffer.capacity
        batch = int(self.batch_size * (k / 2))
        for _ in range(int(self.update_every * (k / 2))):
            agent.update(batch)

    # -- state -----------------------------------------------------------------------------------------------
    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        # the last transition may have been saved from another device: it meets the agent's tensors next step
        agent = self._agent
        if agent is not None and self._prev_state is not None and self._prev_action is not None:
            self._prev_state = self._prev_state.to(device=agent.device, dtype=agent.dtype)
            self._prev_action = self._prev_action.to(device=agent.device, dtype=agent.dtype)
