"""taskbalance: task balancing for multi-task learning in PyTorch.

    import taskbalance as tb
    balancer = tb.make("igbv1+nashmtl", n_tasks=3)
    result = balancer.backward(losses, shared_params=model.encoder.parameters())

Loss-level methods live in :mod:`taskbalance.loss_balancing`, gradient-level ones in
:mod:`taskbalance.gradient_balancing`; :func:`available` lists every registered name.
"""

from __future__ import annotations

from typing import Any

from .balancer import Balancer
from .engine import Engine, EngineFallbackWarning
from .gradient_balancing.base import Combination, GradientBalancer
from .gradient_balancing.sum import Sum
from .loss_balancing.base import Balanced, LossBalancer
from .loss_balancing.equal import Equal
from .registry import GRADIENT_METHODS, LOSS_METHODS, available, gradient_class, loss_class, make
from .result import BalanceResult

__version__ = "0.1.0"

# Method classes by their paper names (tb.IGBv1, tb.NashMTL, ...), imported on first use.
_LAZY = {
    **{entry.split(":")[1]: ("loss_balancing", entry) for entry in LOSS_METHODS.values()},
    **{entry.split(":")[1]: ("gradient_balancing", entry) for entry in GRADIENT_METHODS.values()},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        package, entry = _LAZY[name]
        module_name, class_name = entry.split(":")
        import importlib

        return getattr(importlib.import_module(f"taskbalance.{package}.{module_name}"), class_name)
    raise AttributeError(f"module 'taskbalance' has no attribute {name!r}")


__all__ = [
    "BalanceResult",
    "Balanced",
    "Balancer",
    "Combination",
    "Engine",
    "EngineFallbackWarning",
    "Equal",
    "GradientBalancer",
    "LossBalancer",
    "Sum",
    "available",
    "gradient_class",
    "loss_class",
    "make",
]
