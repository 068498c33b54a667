"""A small Soft Actor-Critic agent, the one IGBv2 uses to choose task weights.

Why our own agent rather than an RL library's (Stable-Baselines3, TorchRL, CleanRL):

- Resumable state. A balancer's ``state_dict()`` must hold the whole agent (networks, target networks, the three
  Adam states, the replay buffer, the RNG state, counters) as tensors and plain values, loadable with
  ``torch.load(weights_only=True)``, so that a resumed run continues bit-identically. SB3 keeps its replay buffer
  in NumPy, draws from the global NumPy/torch RNGs and saves through pickled zip archives; TorchRL's buffers and
  tensordicts have their own serialisation. Either would need an adapter larger than the agent.
- No global state, any device. Every random draw here comes from a generator the agent owns; the buffer lives
  on the agent's device, and acting needs no host synchronisation.
- The action map. IGBv2's actions are task weights K·softmax(u) on a simplex, whose correct log-density
  (:class:`SoftmaxSquash`) no library offers; the squashing map is pluggable here, so the control benchmark
  (``bench/sac_pendulum.py``, :class:`TanhSquash`) exercises the very update code IGBv2 runs.
- Weight. SAC on tiny MLPs is a few hundred lines; the libraries pull in gymnasium, pandas or tensordict and
  pin torch versions, a heavy cost for one loss-balancing method.
"""

from __future__ import annotations

from .networks import GaussianActor, TwinCritic
from .replay import Batch, ReplayBuffer
from .sac import SAC, UpdateInfo
from .squash import SoftmaxSquash, Squash, TanhSquash

__all__ = [
    "SAC",
    "Batch",
    "GaussianActor",
    "ReplayBuffer",
    "SoftmaxSquash",
    "Squash",
    "TanhSquash",
    "TwinCritic",
    "UpdateInfo",
]
