"""torchjd's implementation of the aggregators we also have, driven as its documentation recommends.

torchjd (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232) computes the
Jacobian of the losses w.r.t. the shared parameters with ``mtl_backward(losses, features=features)`` (heads get
their task's gradient, the shared parameters a ``.jac``), then ``jac_to_grad(shared, aggregator)`` aggregates it
into ``.grad``. Options are set to match ours where the defaults differ (GradVac's β).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

INSTALL_HINT = "the torchjd comparison needs torchjd: pip install 'taskbalance[torchjd]'"


def aggregators(n_tasks: int) -> dict[str, Callable[[], Any]]:
    """Our spec -> a factory of torchjd's aggregator for it (raises ImportError with a hint without torchjd).

    An aggregator whose own extra is missing (torchjd's Nash-MTL and CAGrad need cvxpy: ``torchjd[full]``) is left
    out, so its row shows no torchjd ratio instead of the benchmark stopping after minutes of timing.
    """
    try:
        from torchjd import aggregation as agg
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from error
    return {spec: factory for spec, factory in _factories(agg, n_tasks).items() if _builds(factory)}


def _builds(factory: Callable[[], Any]) -> bool:
    try:
        factory()
    except ImportError:
        return False
    return True


def _factories(agg: Any, n_tasks: int) -> dict[str, Callable[[], Any]]:
    return {
        "ew": agg.Mean,
        "upgrad": agg.UPGrad,
        "mgda": agg.MGDA,
        "nashmtl": lambda: agg.NashMTL(n_tasks=n_tasks),
        "cagrad": lambda: agg.CAGrad(c=0.4),
        "pcgrad": agg.PCGrad,
        "imtl_g": agg.IMTLG,
        "aligned_mtl": agg.AlignedMTL,
        "gradvac": lambda: agg.GradVac(beta=0.01),
        "fairgrad": lambda: agg.FairGrad(alpha=1.0),
    }


def backward(losses: list[Any], features: Any, shared: list[Any], aggregator: Any) -> None:
    """One torchjd step's backward: the Jacobian into ``.jac``, aggregated into ``.grad``."""
    from torchjd.autojac import jac_to_grad, mtl_backward

    with warnings.catch_warnings():  # cvxpy's note that torchjd's Nash-MTL problem is not DPP, every step
        warnings.filterwarnings("ignore", message=".*not DPP.*")
        mtl_backward(losses, features=features)
        jac_to_grad(shared, aggregator)


def available() -> bool:
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return False
    return True
