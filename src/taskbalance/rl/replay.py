"""A fixed-capacity FIFO replay buffer of (s, a, r, s', done) transitions, stored on the agent's device.

Storage is preallocated as module buffers, so ``.to(device)`` moves it and ``state_dict()`` saves it; the
write position and fill level are plain ints (no host synchronisation to add or sample). Sampling is uniform
with replacement, indices drawn from a caller's CPU generator so that a run is reproducible on any device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..method import Declared, fields


class Batch(NamedTuple):
    """A minibatch of transitions: states (B, S), actions (B, A), rewards (B,), next states (B, S), dones (B,)."""

    state: Tensor
    action: Tensor
    reward: Tensor
    next_state: Tensor
    done: Tensor


class ReplayBuffer(Declared):
    """Ring buffer of ``capacity`` transitions; once full, each new transition overwrites the oldest."""

    options = ("capacity",)
    state = fields("ptr", "size")  # the next write position and the fill level

    states: Tensor
    actions: Tensor
    rewards: Tensor
    next_states: Tensor
    dones: Tensor

    def __init__(self, capacity: int, state_dim: int, action_dim: int) -> None:
        super().__init__()
        for name, value in (("capacity", capacity), ("state_dim", state_dim), ("action_dim", action_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.capacity = capacity
        dtype = torch.get_default_dtype()
        self.register_buffer("states", torch.zeros(capacity, state_dim, dtype=dtype))
        self.register_buffer("actions", torch.zeros(capacity, action_dim, dtype=dtype))
        self.register_buffer("rewards", torch.zeros(capacity, dtype=dtype))
        self.register_buffer("next_states", torch.zeros(capacity, state_dim, dtype=dtype))
        self.register_buffer("dones", torch.zeros(capacity, dtype=dtype))
        self.ptr = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def clear(self) -> None:
        """Forget every transition (storage is zeroed so that a cleared buffer equals a fresh one)."""
        for t in (self.states, self.actions, self.rewards, self.next_states, self.dones):
            t.zero_()
        self.ptr = 0
        self.size = 0

    def add(
        self, state: Tensor, action: Tensor, reward: Tensor | float, next_state: Tensor, done: Tensor | float = 0.0
    ) -> None:
        """Store one transition (tensors are copied, on the buffer's device and dtype)."""
        i = self.ptr
        self.states[i] = state
        self.actions[i] = action
        self.rewards[i] = reward
        self.next_states[i] = next_state
        self.dones[i] = done
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement from those stored."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        index = torch.randint(0, self.size, (batch_size,), generator=generator).to(self.states.device)
        # index_select: the same rows as t[index], through a plain gather (advanced indexing costs ~3x on the CPU)
        return Batch(
            *(t.index_select(0, index) for t in (self.states, self.actions, self.rewards, self.next_states, self.dones))
        )
