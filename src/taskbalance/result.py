"""What one balanced step reports: :class:`BalanceResult`, and its plain-float form for loggers."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .gradient_balancing.base import Combination
from .loss_balancing.base import Balanced


@dataclass(frozen=True)
class BalanceResult:
    """What :meth:`Balancer.backward` returns for one step (all tensors detached).

    Attributes:
        weights: effective per-task weights (K,): the loss method's weights times the gradient method's
            (when the gradient method is weight-based; otherwise the loss method's alone).
        losses: the raw losses L (K,).
        balanced_losses: ℓ̃ (K,), what the gradient level differentiated. For methods that take a log these are
            negative once L_k < 1: monitor ``losses`` (raw), never ℓ̃, for schedulers and early stopping.
        loss_weights: the loss method's weights (K,).
        gradient_weights: the gradient method's w (K,), or None for methods that return a direction without
            weights (DB-MTL, GradDrop): ``weights`` then holds the loss method's weights alone.
        overhead_s: wall time spent in balancing beyond an ordinary backward of Σ ℓ̃ (loss method, per-task
            gradients, solver). On CUDA this is host time (no synchronisation is forced).
        converged: False when the gradient method's solver did not converge this step (see ``note``).
        note: the solver's reason when ``converged`` is False, or why the step was skipped.
        skipped: True when the step was skipped (with a GradScaler: a non-finite loss or gradient). Nothing was
            balanced then: ``.grad`` holds Inf so that ``scaler.step`` skips the update, no method's state advanced,
            and the weights are NaN.
    """

    weights: Tensor
    losses: Tensor
    balanced_losses: Tensor
    loss_weights: Tensor
    gradient_weights: Tensor | None
    overhead_s: float
    converged: bool = True
    note: str = ""
    skipped: bool = False

    def as_dict(self, task_names: Sequence[str] | None = None, prefix: str = "") -> dict[str, float]:
        """The step as plain Python floats for any logger (TensorBoard, CSV, wandb), one device read in all.

        Keys: ``{prefix}weight/{task}``, ``{prefix}loss/{task}`` (raw), ``{prefix}balanced_loss/{task}``,
        ``{prefix}loss_weight/{task}``, ``{prefix}gradient_weight/{task}`` (weight-based gradient methods only),
        ``{prefix}overhead_s``, ``{prefix}converged`` and ``{prefix}skipped`` (1.0 or 0.0). Tasks are named
        ``task0``, ``task1``, ... unless ``task_names`` (K distinct strings) are given.
        """
        n = self.losses.shape[0]
        names = [f"task{k}" for k in range(n)] if task_names is None else list(task_names)
        if len(names) != n or len(set(names)) != n or not all(isinstance(name, str) for name in names):
            raise ValueError(f"task_names must be {n} distinct strings, got {task_names!r}")
        columns = {
            "weight": self.weights,
            "loss": self.losses,
            "balanced_loss": self.balanced_losses,
            "loss_weight": self.loss_weights,
        }
        if self.gradient_weights is not None:
            columns["gradient_weight"] = self.gradient_weights
        dtype = functools.reduce(torch.promote_types, (column.dtype for column in columns.values()))
        stacked = torch.stack([column.detach().to(dtype) for column in columns.values()])  # on the device: one read
        values: list[list[float]] = stacked.cpu().double().tolist()
        logged = {
            f"{prefix}{column}/{name}": value
            for column, row in zip(columns, values, strict=True)
            for name, value in zip(names, row, strict=True)
        }
        logged[f"{prefix}overhead_s"] = float(self.overhead_s)
        logged[f"{prefix}converged"] = 1.0 if self.converged else 0.0
        logged[f"{prefix}skipped"] = 1.0 if self.skipped else 0.0
        return logged


def step_result(losses: Tensor, balanced: Balanced, combination: Combination | None, overhead: float) -> BalanceResult:
    """The step's report: the gradient method's weights (when it has any) multiply the loss method's."""
    gradient_weights = None if combination is None else combination.weights
    effective = balanced.weights if gradient_weights is None else balanced.weights * gradient_weights
    return BalanceResult(
        weights=effective.detach(),
        losses=losses.detach(),
        balanced_losses=balanced.losses.detach(),
        loss_weights=balanced.weights,
        gradient_weights=None if gradient_weights is None else gradient_weights.detach(),
        overhead_s=overhead,
        converged=combination is None or combination.converged,
        note="" if combination is None else combination.note,
    )
