"""Benchmarks: datasets, models and (later) the experiment runner.

Data is built from what can be installed offline (see :mod:`taskbalance.benchmarks.mnist`) and cached outside
the repository (:mod:`taskbalance.benchmarks.cache`; set ``TASKBALANCE_CACHE`` to move it).
"""

from __future__ import annotations

from .cache import cache_dir
from .mnist import DataSourceError, Digits, load_digits, load_fashion_mnist, load_mnist
from .models import MultiLeNet
from .multimnist import MultiMNIST, load_multimnist

__all__ = [
    "DataSourceError",
    "Digits",
    "MultiLeNet",
    "MultiMNIST",
    "cache_dir",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_multimnist",
]
