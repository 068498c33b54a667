"""Benchmarks: the contract a benchmark fulfils (:mod:`.base`), the benchmarks themselves (:mod:`.multimnist`,
:mod:`.qm9`, :mod:`.nyuv2`, :mod:`.cityscapes`, :mod:`.celeba`, on the shared :mod:`.dense` base and the one
batcher of :mod:`.batches`), listed by name in :mod:`.catalog`; their data (:mod:`.datasets`), models
(:mod:`.models`) and metrics (:mod:`.metrics`); the runner (:mod:`.runner`) and the report (:mod:`.report`).

Data is built from what can be installed offline (see :mod:`taskbalance.benchmarks.datasets.mnist`) and cached
outside the repository (:mod:`taskbalance.benchmarks.datasets.cache`; set ``TASKBALANCE_CACHE`` to move it). The
names below are imported on first use: the datasets need numpy and tqdm (``pip install 'taskbalance[bench]'``),
the core library does not.
"""

from __future__ import annotations

import importlib
from typing import Any

#: name → the module under taskbalance.benchmarks that defines it
_LAZY = {
    "DataSourceError": "datasets.mnist",
    "Digits": "datasets.mnist",
    "MultiLeNet": "models.multilenet",
    "MultiMNIST": "datasets.multimnist",
    "cache_dir": "datasets.cache",
    "load_digits": "datasets.mnist",
    "load_fashion_mnist": "datasets.mnist",
    "load_mnist": "datasets.mnist",
    "load_multimnist": "datasets.multimnist",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
