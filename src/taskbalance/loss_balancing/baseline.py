"""The improvable-gap baseline L̄ shared by IGBv1 and IGBv2: each task's mean raw loss over one early epoch.

Dai, Fei, Lu, "Improvable Gap Balancing for Multi-Task Learning" (UAI 2023): with the ideal loss taken as 0, a
task's current loss divided by its loss early in training measures how much of it is still to improve. The
reference code averages the raw training losses of the second epoch (``base_epoch=1``, 0-based), records the
mean once at the end of that epoch and never updates it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EpochMeanBaseline:
    """Running mean of the raw losses during epoch ``base_epoch``; frozen as :attr:`value` at its end.

    Plain state object (not a module): its owner declares it as a state field, which saves :meth:`state_dict`.
    """

    def __init__(self, base_epoch: int = 1) -> None:
        if base_epoch < 0:
            raise ValueError(f"base_epoch must be >= 0, got {base_epoch}")
        self.base_epoch = base_epoch
        self.reset()

    def reset(self) -> None:
        self.epoch = 0
        self._sum: Tensor | None = None
        self._count = 0
        self.value: Tensor | None = None

    @property
    def ready(self) -> bool:
        """Whether the baseline has been recorded (from the end of epoch ``base_epoch`` on)."""
        return self.value is not None

    def observe(self, losses: Tensor) -> None:
        """Add one step's raw detached losses if this is the baseline epoch."""
        if self.epoch != self.base_epoch:
            return
        values = losses.detach().to(torch.float64)
        self._sum = values.clone() if self._sum is None else self._sum + values
        self._count += 1

    def end_epoch(self) -> None:
        """Close the epoch; at the end of the baseline epoch freeze the mean."""
        if self.epoch == self.base_epoch:
            if self._sum is None or self._count == 0:
                raise RuntimeError(f"no losses were observed during the baseline epoch {self.base_epoch}")
            self.value = self._sum / self._count
            self._sum = None
        self.epoch += 1

    def normalised(self, losses: Tensor) -> Tensor:
        """L / L̄ in the dtype and device of ``losses`` (requires :attr:`ready`)."""
        if self.value is None:
            raise RuntimeError("the baseline is not recorded yet")
        if self.value.device != losses.device:  # once after a resume on another device, not every step
            self.value = self.value.to(losses.device)
        return losses.detach() / self.value.to(losses.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_epoch": self.base_epoch,
            "epoch": self.epoch,
            "sum": None if self._sum is None else self._sum.cpu(),
            "count": self._count,
            "value": None if self.value is None else self.value.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_epoch = int(state["base_epoch"])
        self.epoch = int(state["epoch"])
        self._sum = state["sum"]
        self._count = int(state["count"])
        self.value = state["value"]
