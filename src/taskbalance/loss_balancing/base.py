"""The loss level: a method that turns the K raw losses into K balanced losses.

A loss-balancing method sees only the losses of the current step (and its own history). It returns the
balanced per-task losses ℓ̃ (still attached to the graph) and the task weights it used, so that the gradient
level can differentiate ℓ̃ and runs can log the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..method import Method


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


class LossBalancer(Method):
    """Base class of every loss-balancing method.

    Subclasses implement :meth:`balance` and declare their ``options`` and ``state`` (see
    :mod:`taskbalance.method`), from which ``state_dict()``, repr and the load checks follow. They are
    ``nn.Module``s so that learnable weights (UW, IMTL-L) are ordinary parameters, and ``balancer.to(device)``
    moves them.
    """

    #: whether the method takes log L_k (losses must then be strictly positive)
    takes_log: bool = False

    def forward(self, losses: Tensor) -> Balanced:
        self._require_setup()
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


def log_losses(losses: Tensor) -> Tensor:
    """log L_k, for strictly positive losses (the Balancer checks positivity before calling a method)."""
    return torch.log(losses)


def task_parameter(current: nn.Parameter, n_tasks: int, value: float) -> nn.Parameter:
    """K learnable numbers equal to ``value``, for a reset: ``current`` refilled in place when it already has K
    entries (so an optimizer built on it keeps tracking it), else a new parameter."""
    if current.shape != (n_tasks,):
        return nn.Parameter(torch.full((n_tasks,), value))
    with torch.no_grad():
        current.fill_(value)
    return current


def random_softmax_weights(n_tasks: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """K · softmax(u) with u ~ N(0, I) drawn from ``generator`` on the CPU, returned on ``like``'s device."""
    u = torch.randn(n_tasks, generator=generator, dtype=torch.float64)
    return (n_tasks * torch.softmax(u, dim=0)).to(device=like.device, dtype=like.dtype)
