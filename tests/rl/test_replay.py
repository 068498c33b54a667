"""Replay buffer: FIFO overwrite, uniform sampling of stored transitions only, state round trip."""

from __future__ import annotations

import io

import pytest
import torch

from taskbalance.rl import ReplayBuffer


def _fill(buffer: ReplayBuffer, values: range) -> None:
    for v in values:
        x = float(v)
        buffer.add(torch.full((2,), x), torch.full((1,), -x), 10 * x, torch.full((2,), x + 0.5), v % 2)


def test_fifo_overwrites_the_oldest() -> None:
    buffer = ReplayBuffer(capacity=3, state_dim=2, action_dim=1)
    _fill(buffer, range(2))
    assert (len(buffer), buffer.ptr) == (2, 2)
    _fill(buffer, range(2, 5))  # 5 transitions into 3 slots: 0 and 1 are gone, 3 and 4 took their places
    assert (len(buffer), buffer.ptr) == (3, 2)
    torch.testing.assert_close(buffer.states[:, 0], torch.tensor([3.0, 4.0, 2.0]))
    torch.testing.assert_close(buffer.actions[:, 0], torch.tensor([-3.0, -4.0, -2.0]))
    torch.testing.assert_close(buffer.rewards, torch.tensor([30.0, 40.0, 20.0]))
    torch.testing.assert_close(buffer.next_states[:, 1], torch.tensor([3.5, 4.5, 2.5]))
    torch.testing.assert_close(buffer.dones, torch.tensor([1.0, 0.0, 0.0]))


def test_sampling_is_uniform_over_stored_transitions_and_keeps_them_whole() -> None:
    buffer = ReplayBuffer(capacity=10, state_dim=2, action_dim=1)
    _fill(buffer, range(1, 5))  # 4 of 10 slots used; empty slots hold zeros and must never be drawn
    batch = buffer.sample(8000, torch.Generator().manual_seed(0))
    values = batch.state[:, 0]
    assert set(values.tolist()) == {1.0, 2.0, 3.0, 4.0}
    counts = torch.bincount(values.long(), minlength=5)[1:].double()
    assert float((counts / 8000 - 0.25).abs().max()) < 0.02  # 4σ of a binomial proportion is ≈ 0.019
    torch.testing.assert_close(batch.action[:, 0], -values)
    torch.testing.assert_close(batch.reward, 10 * values)
    torch.testing.assert_close(batch.next_state[:, 1], values + 0.5)
    torch.testing.assert_close(batch.done, values.long().remainder(2).float())


def test_sampling_follows_the_generator() -> None:
    buffer = ReplayBuffer(capacity=10, state_dim=2, action_dim=1)
    _fill(buffer, range(6))
    a = buffer.sample(5, torch.Generator().manual_seed(3))
    b = buffer.sample(5, torch.Generator().manual_seed(3))
    c = buffer.sample(5, torch.Generator().manual_seed(4))
    assert torch.equal(a.state, b.state)
    assert not torch.equal(a.state, c.state)


def test_state_round_trip_and_clear() -> None:
    buffer = ReplayBuffer(capacity=4, state_dim=2, action_dim=1)
    _fill(buffer, range(6))
    stream = io.BytesIO()
    torch.save(buffer.state_dict(), stream)
    stream.seek(0)
    restored = ReplayBuffer(capacity=4, state_dim=2, action_dim=1)
    restored.load_state_dict(torch.load(stream, weights_only=True))
    assert (restored.ptr, restored.size) == (buffer.ptr, buffer.size)
    assert torch.equal(restored.states, buffer.states)
    restored.clear()
    fresh = ReplayBuffer(capacity=4, state_dim=2, action_dim=1)
    assert len(restored) == 0
    for key, value in fresh.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"state is for ReplayBuffer\(capacity=4\)"):
        ReplayBuffer(capacity=5, state_dim=2, action_dim=1).load_state_dict(buffer.state_dict())


def test_errors() -> None:
    buffer = ReplayBuffer(capacity=2, state_dim=1, action_dim=1)
    with pytest.raises(RuntimeError, match="empty"):
        buffer.sample(1, torch.Generator())
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        ReplayBuffer(capacity=0, state_dim=1, action_dim=1)
