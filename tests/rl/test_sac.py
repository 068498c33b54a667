"""The SAC update against hand computations on tiny networks; temperature, Polyak, state, devices, RNG."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from taskbalance.rl import SAC, SoftmaxSquash, TanhSquash


def _agent(**options: Any) -> SAC:
    defaults: dict[str, Any] = {"hidden": (4,), "buffer_size": 16, "seed": 0}
    return SAC(2, 2, TanhSquash(-1.0, 3.0), **{**defaults, **options})


def _fill(agent: SAC, n: int = 12, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        s, a, s2 = (torch.randn(2, generator=gen) for _ in range(3))
        agent.store(s, a, float(torch.randn(1, generator=gen)), s2, float(i % 3 == 0))


def _linear(layer: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(layer, nn.Linear)
    return x @ layer.weight.detach().T + layer.bias.detach()


def _q(net: nn.Sequential, s: Tensor, a: Tensor) -> Tensor:
    """One critic of hidden=(4,) by hand: Linear → ReLU → Linear."""
    return _linear(net[2], torch.relu(_linear(net[0], torch.cat([s, a], -1)))).squeeze(-1)


def _tanh_sample(agent: SAC, s: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(a, log π(a|s)) by hand: trunk Linear → ReLU, heads μ and clamped log σ, a = 1 + 2 tanh(u)."""
    h = torch.relu(_linear(agent.actor.trunk[0], s))
    mean, log_std = _linear(agent.actor.mean, h), _linear(agent.actor.log_std, h).clamp(-20, 2)
    u = mean + log_std.exp() * eps
    gaussian: Distribution = Normal(mean, log_std.exp())  # Distribution's log_prob is typed, Normal's is not
    log_prob = gaussian.log_prob(u) - torch.log(2 * (1 - torch.tanh(u) ** 2))
    return 1 + 2 * torch.tanh(u), log_prob.sum(-1)


def test_critic_target_and_critic_step_match_hand_computation() -> None:
    agent = _agent(gamma=0.9, init_alpha=0.3)
    _fill(agent)
    # replay the agent's random stream: minibatch indices, then the noise of a' ~ π(·|s')
    gen = torch.Generator()
    gen.set_state(agent.generator.get_state())
    index = torch.randint(0, len(agent.buffer), (5,), generator=gen)
    eps = torch.randn(5, 2, generator=gen)
    buf = agent.buffer
    s, a, r, s2, d = buf.states[index], buf.actions[index], buf.rewards[index], buf.next_states[index], buf.dones[index]
    a2, log_prob2 = _tanh_sample(agent, s2, eps)
    target_q = torch.min(_q(agent.critic_target.q1, s2, a2), _q(agent.critic_target.q2, s2, a2))
    y = r + 0.9 * (1 - d) * (target_q - 0.3 * log_prob2)

    before = copy.deepcopy(agent.critic)
    q1, q2 = before(s, a)
    expected_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    grads = torch.autograd.grad(expected_loss, list(before.parameters()))

    info = agent.update(5)
    torch.testing.assert_close(info.critic_loss, expected_loss.detach())
    # Adam's first step: θ − lr · g / (|g| + ε) (bias corrections cancel), from the critic loss alone
    for (name, p), old, g in zip(agent.critic.named_parameters(), before.parameters(), grads, strict=True):
        torch.testing.assert_close(p.detach(), old.detach() - 3e-4 * g / (g.abs() + 1e-8), msg=name)
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, msg=f"{name}: the actor loss leaked into the critic's gradient")


def test_td_target_uses_the_agents_noise() -> None:
    agent = _agent(gamma=0.5)
    _fill(agent)
    batch = agent.buffer.sample(4, torch.Generator().manual_seed(9))
    gen = torch.Generator()
    gen.set_state(agent.generator.get_state())
    a2, log_prob2 = _tanh_sample(agent, batch.next_state, torch.randn(4, 2, generator=gen))
    q = torch.min(_q(agent.critic_target.q1, batch.next_state, a2), _q(agent.critic_target.q2, batch.next_state, a2))
    expected = batch.reward + 0.5 * (1 - batch.done) * (q - 0.2 * log_prob2)
    torch.testing.assert_close(agent.td_target(batch.reward, batch.next_state, batch.done), expected)


def test_polyak_update() -> None:
    agent = _agent(tau=0.25)
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(1.0)
    online = [p.detach().clone() for p in agent.critic.parameters()]
    target = [p.detach().clone() for p in agent.critic_target.parameters()]
    agent.soft_update()
    for new, theta, old in zip(agent.critic_target.parameters(), online, target, strict=True):
        torch.testing.assert_close(new, 0.25 * theta + 0.75 * old)
    # inside update(): the target follows the critic *after* its step
    _fill(agent)
    target = [p.detach().clone() for p in agent.critic_target.parameters()]
    agent.update(4)
    for new, theta, old in zip(agent.critic_target.parameters(), agent.critic.parameters(), target, strict=True):
        torch.testing.assert_close(new, 0.25 * theta.detach() + 0.75 * old)


@pytest.mark.parametrize(("target_entropy", "direction"), [(50.0, 1.0), (-50.0, -1.0)])
def test_temperature_moves_toward_the_target_entropy(target_entropy: float, direction: float) -> None:
    """Entropy below the target → α grows; above → α shrinks. Adam's first step moves log α by exactly lr."""
    agent = _agent(target_entropy=target_entropy, init_alpha=0.2)
    _fill(agent)
    info = agent.update(8)
    entropy = -float(info.log_prob)
    assert (entropy < target_entropy) == (direction > 0)
    assert math.isclose(float(agent.log_alpha.detach()), math.log(0.2) + direction * 3e-4, rel_tol=0, abs_tol=1e-6)
    for _ in range(5):
        agent.update(8)
    assert (float(agent.alpha) - 0.2) * direction > 0


def test_fixed_temperature() -> None:
    agent = _agent(learn_alpha=False, init_alpha=0.5)
    _fill(agent)
    for _ in range(3):
        assert agent.update(4).alpha_loss is None
    assert float(agent.alpha) == pytest.approx(0.5)


def test_deterministic_action_is_squashed_mean() -> None:
    agent = SAC(3, 3, SoftmaxSquash(3.0), hidden=(8,), seed=2)
    s = torch.randn(5, 3)
    mean, _ = agent.actor(s)
    torch.testing.assert_close(agent.act(s, deterministic=True), 3 * torch.softmax(mean, -1))
    sampled = agent.act(s)
    torch.testing.assert_close(sampled.sum(-1), torch.full((5,), 3.0))
    assert not torch.allclose(sampled, 3 * torch.softmax(mean, -1))
    assert agent.act(s[0]).shape == (3,)


def _save_load(module: nn.Module) -> dict[str, Any]:
    stream = io.BytesIO()
    torch.save(module.state_dict(), stream)
    stream.seek(0)
    state: dict[str, Any] = torch.load(stream, weights_only=True)
    return state


def test_resume_is_bit_identical() -> None:
    a = SAC(3, 3, SoftmaxSquash(3.0), hidden=(8, 8), buffer_size=32, seed=5)
    _fill_square(a, 20)
    for _ in range(3):
        a.update(6)
    b = SAC(3, 3, SoftmaxSquash(3.0), hidden=(8, 8), buffer_size=32, seed=99)
    b.load_state_dict(_save_load(a))
    for agent in (a, b):
        _fill_square(agent, 5, seed=3)
        for _ in range(4):
            agent.update(6)
    s = torch.randn(4, 3)
    assert torch.equal(a.act(s), b.act(s))
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if isinstance(x, Tensor):
            assert torch.equal(x, y), key
    assert a.n_updates == b.n_updates == 7


def _fill_square(agent: SAC, n: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        s, s2 = torch.rand(3, generator=gen), torch.rand(3, generator=gen)
        agent.store(s, agent.act(s), float(torch.randn(1, generator=gen)), s2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reset_restores_the_fresh_agent(dtype: torch.dtype) -> None:
    """In float64: the float32 build cast to float64, not float64 draws (IGBv2's reset after balancer.double())."""
    fresh = _agent(seed=3).to(dtype).state_dict()
    agent = _agent(seed=3).to(dtype)
    _fill(agent)
    agent.update(4)
    agent.reset()
    state = agent.state_dict()
    for key, value in fresh.items():
        if isinstance(value, Tensor):
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert state["_extra_state"]["optimizers"]["actor"]["state"] == {}
    assert torch.equal(state["_extra_state"]["generator"], fresh["_extra_state"]["generator"])


def test_global_rng_is_untouched() -> None:
    before = torch.random.get_rng_state()
    agent = _agent(seed=1)
    _fill(agent)
    agent.update(4)
    agent.act(torch.zeros(2))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_float64_moves_optimizer_state() -> None:
    agent = _agent()
    _fill(agent)
    agent.update(4)
    agent.double()
    assert agent.dtype == torch.float64 and agent.buffer.states.dtype == torch.float64
    moments = agent.critic_optimizer.state_dict()["state"][0]["exp_avg"]
    assert moments.dtype == torch.float64
    agent.update(4)  # Adam runs on the moved parameters and moments
    assert all(p.dtype == torch.float64 for p in agent.parameters())


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        _agent(gamma=1.5)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
        _agent(tau=0.0)
    with pytest.raises(ValueError, match="learning rates"):
        _agent(actor_lr=-1.0)
    with pytest.raises(ValueError, match="init_alpha"):
        _agent(init_alpha=0.0)
    with pytest.raises(ValueError, match="hidden width"):
        _agent(hidden=(0,))
    with pytest.raises(TypeError, match="Squash"):
        SAC(2, 2, nn.Identity())  # type: ignore[arg-type]


def test_fused_adam_matches_the_foreach_kernel() -> None:
    """The fused Adam kernel (the CPU default here) computes the per-parameter Adam step of the foreach one."""
    fresh = SAC(3, 3, SoftmaxSquash(3.0), hidden=(16,), buffer_size=32, seed=4)
    fused = SAC(3, 3, SoftmaxSquash(3.0), hidden=(16,), buffer_size=32, seed=4)
    assert fused.critic_optimizer.param_groups[0]["fused"] is True
    looped = SAC(3, 3, SoftmaxSquash(3.0), hidden=(16,), buffer_size=32, seed=4)
    looped._adam_kernel = lambda: (None, True)  # type: ignore[method-assign]
    looped._build_optimizers()
    assert looped.critic_optimizer.param_groups[0]["foreach"] is True
    for agent in (fused, looped):
        _fill_square(agent, 20)
        for _ in range(30):
            agent.update(8)
    for (name, x), y in zip(fused.named_parameters(), looped.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)
        assert not torch.equal(x, fresh.get_parameter(name)), f"{name} did not move"


def test_checkpoint_with_other_adam_flags_loads_with_this_agents_kernel() -> None:
    """A state saved with the per-parameter loop (PyTorch's CPU default, and this agent's before) resumes exactly."""
    a = SAC(3, 3, SoftmaxSquash(3.0), hidden=(8,), buffer_size=32, seed=5)
    _fill_square(a, 20)
    for _ in range(3):
        a.update(6)
    state = _save_load(a)
    for opt in state["_extra_state"]["optimizers"].values():
        for group in opt["param_groups"]:
            group["fused"], group["foreach"] = None, None
    b = SAC(3, 3, SoftmaxSquash(3.0), hidden=(8,), buffer_size=32, seed=99)
    b.load_state_dict(state)
    for opt in (b.actor_optimizer, b.critic_optimizer, b.alpha_optimizer):
        assert opt.param_groups[0]["fused"] is True
    for agent in (a, b):
        for _ in range(3):
            agent.update(6)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if isinstance(x, Tensor):
            assert torch.equal(x, y), key
