"""The loss level: a method that turns the K raw losses into K balanced losses.

A loss-balancing method sees only the losses of the current step (and its own history). It returns the
balanced per-task losses ℓ̃ (still attached to the graph) and the task weights it used, so that the gradient
level can differentiate ℓ̃ and runs can log the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Balanced:
    """What a loss method returns for one step.

    Attributes:
        losses: the balanced per-task losses ℓ̃, shape (K,), differentiable w.r.t. the model (and w.r.t. the
            method's own parameters, e.g. UW's log-variances).
        weights: the task weights of this step, shape (K,), detached. For methods of the form ℓ̃_k = w_k·f(L_k)
            this is w; for UW / IMTL-L it is the multiplier of L_k.
    """

    losses: Tensor
    weights: Tensor


class LossBalancer(nn.Module):
    """Base class of every loss-balancing method.

    Subclasses implement :meth:`balance` and, if they keep state, :meth:`reset`, :meth:`get_extra_state` and
    :meth:`set_extra_state` (non-tensor state and lazily created tensors) so that ``state_dict()`` captures
    everything. They are ``nn.Module``s so that learnable weights (UW, IMTL-L) are ordinary parameters, and
    ``balancer.to(device)`` moves them.

    ``n_tasks`` is given by :class:`~taskbalance.Balancer` through :meth:`setup` (or directly to the constructor
    of methods that create parameters).
    """

    name: ClassVar[str] = ""
    #: whether the method takes log L_k (losses must then be strictly positive)
    takes_log: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.n_tasks = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def setup(self, n_tasks: int) -> None:
        """Bind the method to K tasks. Called once by the Balancer; creates parameters and state."""
        if self.n_tasks not in (0, n_tasks):
            raise ValueError(f"{type(self).__name__} was set up for {self.n_tasks} tasks, not {n_tasks}")
        self.n_tasks = n_tasks
        self.reset()

    def reset(self) -> None:
        """Forget all history (epoch counters, baselines, buffers) and re-initialise parameters."""

    def forward(self, losses: Tensor) -> Balanced:
        if self.n_tasks == 0:
            raise RuntimeError(f"{type(self).__name__} is not set up: wrap it in taskbalance.Balancer")
        return self.balance(losses)

    def balance(self, losses: Tensor) -> Balanced:  # pragma: no cover - abstract
        """Balanced losses for validated raw losses of shape (K,)."""
        raise NotImplementedError

    # -- hooks the training loop reaches through the Balancer ----------------------------------------------
    def end_epoch(self) -> None:
        """Called once at the end of every training epoch. Default: nothing."""

    def after_step(self, losses: Tensor) -> None:
        """Called after ``optimizer.step()`` with the losses of the same batch under the updated model.

        Only FAMO uses it; the default does nothing.
        """

    # -- state -----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks}

    def set_extra_state(self, state: Any) -> None:
        if state["n_tasks"] != self.n_tasks:
            raise ValueError(f"state is for {state['n_tasks']} tasks but {type(self).__name__} has {self.n_tasks}")

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}"


def log_losses(losses: Tensor) -> Tensor:
    """log L_k, for strictly positive losses (the Balancer checks positivity before calling a method)."""
    return torch.log(losses)


def random_softmax_weights(n_tasks: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """K · softmax(u) with u ~ N(0, I) drawn from ``generator`` on the CPU, returned on ``like``'s device."""
    u = torch.randn(n_tasks, generator=generator, dtype=torch.float64)
    return (n_tasks * torch.softmax(u, dim=0)).to(device=like.device, dtype=like.dtype)
