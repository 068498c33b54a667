"""IGBv2: the schedule and reward over epochs 0–6, weights, state round trip, parameters, options."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

import taskbalance as tb
from taskbalance.rl import SAC
from tests import reference
from tests.models import TinyMTL, make_data, task_losses

N = 20  # iterations per epoch in the schedule test


def _igb(balancer: tb.Balancer) -> Any:
    return balancer.loss


class _Run:
    """TinyMTL trained through tb.Balancer(IGBv2), recording every step and spying on the agent."""

    def __init__(self, **options: Any) -> None:
        self.model = TinyMTL()
        self.x, self.y = make_data()
        self.balancer = tb.Balancer(loss=tb.IGBv2(**options), n_tasks=3)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.02)
        self.losses: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.balanced: list[Tensor] = []
        self.buffer_sizes: list[int] = []
        self.updates: list[tuple[int, int, int]] = []  # (step, batch size, buffer size)
        self.acts: list[tuple[int, Tensor, Tensor]] = []  # (step, state, action)
        igb, agent = _igb(self.balancer), _igb(self.balancer).agent
        update, act = agent.update, agent.act

        def spy_update(batch_size: int) -> Any:
            self.updates.append((igb.step, batch_size, len(agent.buffer)))
            return update(batch_size)

        def spy_act(state: Tensor, deterministic: bool = False) -> Tensor:
            action: Tensor = act(state, deterministic)
            self.acts.append((igb.step, state.clone(), action.clone()))
            return action

        agent.update, agent.act = spy_update, spy_act

    def epoch(self, n: int) -> None:
        for _ in range(n):
            _, losses = task_losses(self.model, self.x, self.y)
            result = self.balancer.backward(losses, self.model.encoder.parameters())
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.losses.append(result.losses)
            self.weights.append(result.weights)
            self.balanced.append(result.balanced_losses)
            self.buffer_sizes.append(len(_igb(self.balancer).agent.buffer))
        self.balancer.end_epoch()


def test_schedule_and_reward_over_epochs_0_to_6() -> None:
    """N = 20 iterations per epoch, SAC training every 10 iterations, a 60-transition buffer, reward scale 2."""
    run = _Run(seed=0, update_every=10, batch_size=16, buffer_size=60, hidden=(8, 8), reward_scale=2.0)
    rng_before = torch.random.get_rng_state()  # after TinyMTL, whose nn.Linear layers draw from it
    igb = _igb(run.balancer)
    snapshot: dict[str, Tensor] = {}
    for epoch in range(7):
        run.epoch(N)
        if epoch == 2:
            snapshot = {k: v.clone() for k, v in igb.agent.buffer.state_dict().items() if isinstance(v, Tensor)}
    assert igb.epoch == 7 and igb.step == 7 * N
    losses, weights = torch.stack(run.losses), torch.stack(run.weights)

    # storage from epoch 2 (its first step stores the transition from the last step of epoch 1), FIFO capped at 60
    assert run.buffer_sizes == [0] * 40 + [min(t - 39, 60) for t in range(40, 140)]

    # training from epoch 3 at global steps ≡ 0 mod 10, after that step's transition is stored. With
    # k = 1 + |buffer|/60: |buffer| = 21 → k/2 = 0.675 → int(6.75) = 6 updates of int(10.8) = 10 transitions;
    # 31 → 0.7583 → 7 × 12; 41 → 0.8417 → 8 × 13; 51 → 0.925 → 9 × 14; full (60) → 10 × 16.
    by_step: dict[int, list[tuple[int, int]]] = {}
    for step, batch, size in run.updates:
        by_step.setdefault(step, []).append((batch, size))
    assert sorted(by_step) == list(range(60, 140, 10))
    assert by_step[60] == [(10, 21)] * 6
    assert by_step[70] == [(12, 31)] * 7
    assert by_step[80] == [(13, 41)] * 8
    assert by_step[90] == [(14, 51)] * 9
    for step in range(100, 140, 10):
        assert by_step[step] == [(16, 60)] * 10
    assert igb.agent.n_updates == 6 + 7 + 8 + 9 + 4 * 10

    # random weights K·softmax(randn(K)) from the method's generator before epoch 5 (after the agent's seed draw)
    gen = torch.Generator().manual_seed(0)
    torch.randint(0, 2**62, (1,), generator=gen)
    for t in range(5 * N):
        expected = 3 * torch.softmax(torch.randn(3, generator=gen, dtype=torch.float64), dim=0)
        assert torch.equal(weights[t], expected.float()), t

    # the policy from epoch 5 on: one stochastic action per step, on the current losses
    assert [step for step, _, _ in run.acts] == list(range(5 * N, 7 * N))
    for step, state, action in run.acts:
        assert torch.equal(state, losses[step])
        assert torch.equal(weights[step], action)
    policy = weights[5 * N :]
    torch.testing.assert_close(policy.sum(-1), torch.full((2 * N,), 3.0))
    assert bool((policy > 0).all()) and bool((policy < 3).all())
    assert not torch.equal(policy[0], policy[1])

    # ℓ̃ = w · log L at every step
    torch.testing.assert_close(torch.stack(run.balanced), weights * losses.log())

    # rewards: r_t = 2 · min_k (L_k(t−1) − L_k(t)) / L̄_k, L̄ = epoch-1 mean; stored at step t in slot (t−40) % 60
    baseline = losses[N : 2 * N].double().mean(0).float()

    def check(buffer: dict[str, Tensor], steps: range) -> None:
        for t in steps:
            i = (t - 40) % 60
            assert torch.equal(buffer["states"][i], losses[t - 1]), t
            assert torch.equal(buffer["actions"][i], weights[t - 1]), t
            assert torch.equal(buffer["next_states"][i], losses[t]), t
            reward = 2.0 * ((losses[t - 1] - losses[t]) / baseline).min()
            torch.testing.assert_close(buffer["rewards"][i], reward, rtol=1e-6, atol=1e-9)
            assert float(buffer["dones"][i]) == 0.0

    check(snapshot, range(40, 60))
    check({k: v for k, v in igb.agent.buffer.state_dict().items() if isinstance(v, Tensor)}, range(80, 140))
    assert torch.equal(torch.random.get_rng_state(), rng_before), "IGBv2 touched the global RNG"


@pytest.mark.parametrize("observation", ["log", "baseline"])
def test_observation_is_the_state_the_agent_stores_and_acts_on(observation: str) -> None:
    """s = log L or L / L̄ in every stored transition and every action; the reward still reads the raw losses."""
    options: dict[str, Any] = {"train_epoch": 2, "policy_epoch": 2, "update_every": 10, "batch_size": 8}
    run = _Run(seed=0, hidden=(8, 8), observation=observation, **options)
    for _ in range(3):
        run.epoch(N)
    losses, weights = torch.stack(run.losses), torch.stack(run.weights)
    baseline = losses[N : 2 * N].double().mean(0).float()

    def seen(raw: Tensor) -> Tensor:
        return raw.log() if observation == "log" else raw / baseline

    assert [step for step, _, _ in run.acts] == list(range(2 * N, 3 * N))
    for step, state, action in run.acts:
        assert torch.equal(state, seen(losses[step])) and torch.equal(weights[step], action)
    buffer = _igb(run.balancer).agent.buffer
    assert len(buffer) == N
    for t in range(2 * N, 3 * N):
        i = t - 2 * N
        assert torch.equal(buffer.states[i], seen(losses[t - 1])), t
        assert torch.equal(buffer.next_states[i], seen(losses[t])), t
        torch.testing.assert_close(buffer.rewards[i], ((losses[t - 1] - losses[t]) / baseline).min())


def _saturation_under_loss_scales(observation: str) -> tuple[float, float]:
    """Losses scaled by 1e-6, 1, 1e6, policy from step 30 of 160: (share of the last 60 steps in which one task
    has > 99.9% of the weight, largest second moment of the critics' Adam)."""
    gen = torch.Generator().manual_seed(0)
    options: dict[str, Any] = {"train_epoch": 2, "policy_epoch": 3, "update_every": 4, "batch_size": 16}
    balancer = tb.make("igbv2", n_tasks=3, seed=0, hidden=(16, 16), observation=observation, **options)
    theta, target = torch.zeros(4, 3, requires_grad=True), torch.randn(4, 3, generator=gen)
    scales, weights = torch.tensor([1e-6, 1.0, 1e6]), []
    for t in range(160):
        x = torch.randn(16, 4, generator=gen)
        noise = 0.1 * torch.randn(16, 3, generator=gen)
        weights.append(balancer.backward(((x @ (theta - target) - noise) ** 2).mean(0) * scales, [theta]).weights)
        with torch.no_grad():
            theta -= 0.05 * theta.grad  # type: ignore[operator]
            theta.grad = None
        if (t + 1) % 10 == 0:
            balancer.end_epoch()
    saturated = (torch.stack(weights[-60:]).max(1).values > 3 * 0.999).float().mean().item()
    critic = _igb(balancer).agent.critic_optimizer.state.values()
    return saturated, max(state["exp_avg_sq"].max().item() for state in critic)


@pytest.mark.parametrize("observation", ["raw", "log", "baseline"])
def test_scale_free_observations_do_not_saturate_the_policy(observation: str) -> None:
    """The documented trap (raw losses of scales 1e-6..1e6 saturate the policy) and its remedy."""
    saturated, second_moment = _saturation_under_loss_scales(observation)
    if observation == "raw":
        assert saturated > 0.5 and second_moment > 1e12
    else:
        assert saturated == 0.0 and second_moment < 1e3


def test_observation_option_from_a_spec_and_in_the_saved_identity() -> None:
    logged = tb.make("igbv2[observation=log]", n_tasks=2, seed=0)
    assert _igb(logged).observation == "log"
    default = tb.make("igbv2", n_tasks=2, seed=0)
    assert default.state_dict()["loss._extra_state"]["options"]["observation"] == "raw"
    with pytest.raises(ValueError, match="observation"):
        default.load_state_dict(logged.state_dict())
    with pytest.raises(ValueError, match="observation"):
        logged.load_state_dict(default.state_dict())


def test_default_update_counts_and_batch_sizes() -> None:
    """Paper defaults: int(50·k/2) updates of int(256·k/2), k = 1 + |buffer|/10,000."""
    balancer = tb.make("igbv2", n_tasks=2, seed=0)
    igb = _igb(balancer)
    agent = igb.agent
    calls: list[int] = []
    agent.update = calls.append
    for size, expected in [(1, (25, 128)), (2_500, (31, 160)), (5_000, (37, 192)), (10_000, (50, 256))]:
        agent.buffer.size = size
        calls.clear()
        igb._train(agent)
        assert (len(calls), calls[0]) == expected, size
        assert set(calls) == {expected[1]}


# -- state round trip ----------------------------------------------------------------------------------------
OPTIONS: dict[str, Any] = {
    "train_epoch": 3,
    "policy_epoch": 4,
    "update_every": 5,
    "batch_size": 8,
    "buffer_size": 32,
    "hidden": (8, 8),
}
EPOCH = 10  # iterations per epoch with OPTIONS: storage from step 20, training from 30, the policy from 40


def _steps(balancer: tb.Balancer, model: TinyMTL, optimizer: torch.optim.Optimizer, steps: range) -> list[Tensor]:
    x, y = make_data(n=24)
    out = []
    for t in steps:
        xb, yb = x[(t % 3) * 8 : (t % 3 + 1) * 8], y[(t % 3) * 8 : (t % 3 + 1) * 8]
        _, losses = task_losses(model, xb, yb)
        out.append(balancer.backward(losses, model.encoder.parameters()).weights)
        optimizer.step()
        optimizer.zero_grad()
        if (t + 1) % EPOCH == 0:
            balancer.end_epoch()
    return out


@pytest.mark.parametrize("interrupt", [37, 47])
def test_resumed_run_is_bit_identical(interrupt: int) -> None:
    """Interrupted at step 37 (epoch 3: random weights, SAC training) or 47 (epoch 4: the policy acts), saved
    with torch.save, loaded with weights_only=True into fresh objects: the rest equals the uninterrupted run,
    across further SAC training calls (every 5 steps)."""
    total = 56

    def fresh(seed: int) -> tuple[tb.Balancer, TinyMTL, torch.optim.Optimizer]:
        model = TinyMTL(seed=seed)
        balancer = tb.make("igbv2", n_tasks=3, seed=seed, **OPTIONS)
        return balancer, model, torch.optim.Adam(model.parameters(), lr=1e-2)

    balancer, model, optimizer = fresh(0)
    uninterrupted = _steps(balancer, model, optimizer, range(total))

    first, model_1, optimizer_1 = fresh(0)
    _steps(first, model_1, optimizer_1, range(interrupt))
    saved = reference.roundtrip(
        {"balancer": first.state_dict(), "model": model_1.state_dict(), "optimizer": optimizer_1.state_dict()}
    )
    resumed, model_2, optimizer_2 = fresh(123)  # different seed and weights: everything must come from the state
    resumed.load_state_dict(saved["balancer"])
    model_2.load_state_dict(saved["model"])
    optimizer_2.load_state_dict(saved["optimizer"])
    rest = _steps(resumed, model_2, optimizer_2, range(interrupt, total))

    assert _igb(resumed).agent.n_updates == _igb(balancer).agent.n_updates > 0
    for t, (a, b) in enumerate(zip(uninterrupted[interrupt:], rest, strict=True), start=interrupt):
        assert torch.equal(a, b), t
    for p, q in zip(model.parameters(), model_2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert reference.same(balancer.state_dict(), resumed.state_dict())


def test_reset_restores_the_freshly_set_up_state() -> None:
    fresh = tb.make("igbv2", n_tasks=3, seed=4, **OPTIONS).state_dict()
    balancer = tb.make("igbv2", n_tasks=3, seed=4, **OPTIONS)
    model = TinyMTL()
    _steps(balancer, model, torch.optim.SGD(model.parameters(), lr=0.01), range(45))
    assert _igb(balancer).agent.n_updates > 0
    balancer.reset()
    assert reference.same(fresh, balancer.state_dict())


# -- parameters, dtype, invariance ---------------------------------------------------------------------------
def test_agent_is_not_in_the_balancers_parameters_but_follows_to() -> None:
    balancer = tb.make(
        "igbv2", n_tasks=3, seed=0, base_epoch=0, train_epoch=1, policy_epoch=1, update_every=2, batch_size=4
    )
    agent: SAC = _igb(balancer).agent
    assert list(balancer.parameters()) == []
    assert sum(p.numel() for p in agent.parameters()) > 0
    model = TinyMTL()
    x, y = make_data()
    for epoch in range(3):
        if epoch == 2:  # after SAC training: the agent and its Adam moments follow balancer.double()
            assert agent.n_updates > 0
            balancer.double()
            model.double()
            x, y = x.double(), y.double()
        for _ in range(4):
            _, losses = task_losses(model, x, y)
            result = balancer.backward(losses, model.encoder.parameters(), features=None)
        balancer.end_epoch()
    assert agent.dtype == torch.float64 and agent.buffer.states.dtype == torch.float64
    assert agent.actor_optimizer.state_dict()["state"][0]["exp_avg"].dtype == torch.float64
    assert result.weights.dtype == torch.float64


def test_loss_scale_leaves_rewards_and_gradients_unchanged_before_the_policy() -> None:
    """L̄ scales with L, so r is scale-free; log(cL) = log c + log L, so ∇ℓ̃ is too (random-weight epochs)."""
    outcomes = []
    for scale in (torch.ones(3), torch.tensor([10.0, 0.1, 3.0])):
        model = TinyMTL()
        x, y = make_data()
        balancer = tb.make("igbv2", n_tasks=3, seed=2, **OPTIONS)
        grads = []
        for t in range(3 * EPOCH):
            _, losses = task_losses(model, x, y)
            balancer.backward(losses * scale, model.encoder.parameters())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.02 * p.grad)
                    p.grad = None
            if (t + 1) % EPOCH == 0:
                balancer.end_epoch()
        buffer = _igb(balancer).agent.buffer
        outcomes.append((buffer.rewards[: len(buffer)].clone(), torch.stack(grads)))
    torch.testing.assert_close(outcomes[0][0], outcomes[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outcomes[0][1], outcomes[1][1], rtol=1e-4, atol=1e-6)


def test_reference_log_prob_option_reaches_the_agent() -> None:
    balancer = tb.make("igbv2", n_tasks=4, seed=0, log_prob="reference")
    assert _igb(balancer).agent.squash.density == "reference"
    assert tb.make("igbv2", n_tasks=4, seed=0).loss.agent.squash.density == "simplex"  # type: ignore[union-attr]


def test_reward_scale_is_settable_and_saved() -> None:
    balancer = tb.make("igbv2", n_tasks=2, seed=0)
    igb = _igb(balancer)
    igb.reward_scale = 4.0  # e.g. initial_lr / current_lr at an epoch start
    other = tb.make("igbv2", n_tasks=2, seed=0)
    other.load_state_dict(reference.roundtrip(balancer.state_dict()))
    assert math.isclose(_igb(other).reward_scale, 4.0)
    balancer.reset()
    assert igb.reward_scale == 1.0
    with pytest.raises(ValueError, match="positive finite"):
        igb.reward_scale = 0.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_epoch": 1}, r"train_epoch must be an int >= 2"),
        ({"policy_epoch": 2}, r"policy_epoch must be an int >= 3"),
        ({"update_every": 1}, r"update_every must be an int >= 2"),
        ({"batch_size": 1}, r"batch_size must be an int >= 2"),
        ({"buffer_size": 0}, r"buffer_size must be an int >= 1"),
        ({"log_prob": "tanh"}, r"'simplex' or 'reference'"),
        ({"observation": "sqrt"}, r"observation must be 'raw', 'log' or 'baseline'"),
        ({"reward_scale": -1.0}, r"reward_scale must be a positive"),
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
        ({"tau": 0.0}, r"tau must be in \(0, 1\]"),
        ({"lr": 0.0}, r"learning rates"),
        ({"hidden": (0,)}, r"hidden width"),
    ],
)
def test_bad_options_raise(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tb.IGBv2(**options)


def test_not_set_up() -> None:
    with pytest.raises(RuntimeError, match="not set up"):
        tb.IGBv2(seed=0).agent  # noqa: B018
