"""Benchmark names → their classes, imported on first use.

A benchmark module may need an optional package (numpy and tqdm for every benchmark, torch_geometric for QM9,
pillow for CelebA); importing it lazily keeps this catalog, and the command line that lists it, working with torch
alone, and the module's own ImportError says which extra to install.
"""

from __future__ import annotations

import importlib

from .base import Benchmark

#: the README's default comparison (``taskbalance run``'s default methods)
DEFAULT_METHODS = ("ew", "igbv1", "igbv2", "dbmtl", "imgrad", "nashmtl", "igbv1+nashmtl")

#: benchmark name → "module:Class" under taskbalance.benchmarks
BENCHMARKS: dict[str, str] = {
    "multimnist": "multimnist:MultiMNISTBenchmark",
    "multifashion": "multimnist:MultiFashionBenchmark",
    "multifashion_mnist": "multimnist:MultiFashionMNISTBenchmark",
    "qm9": "qm9:QM9Benchmark",
    "nyuv2": "nyuv2:NYUv2Benchmark",
    "cityscapes": "cityscapes:CityscapesBenchmark",
    "celeba": "celeba:CelebABenchmark",
}


def available() -> list[str]:
    """The registered benchmark names."""
    return list(BENCHMARKS)


def benchmark_class(name: str) -> type[Benchmark]:
    """The class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        ImportError: the benchmark's module or its optional dependency is not installed.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    module_name, class_name = BENCHMARKS[name].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
        raise TypeError(f"{BENCHMARKS[name]} is not a Benchmark subclass")
    return cls


def make_benchmark(name: str, protocol: str | None = None, data_dir: str | None = None) -> Benchmark:
    """An instance of benchmark ``name`` under ``protocol`` (its default when None), reading ``data_dir``."""
    return benchmark_class(name)(protocol=protocol, data_dir=data_dir)
