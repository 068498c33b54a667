"""The benchmark catalog: names, lazy imports, errors."""

from __future__ import annotations

import importlib.util

import pytest

from taskbalance.benchmarks import catalog
from taskbalance.benchmarks.base import Benchmark
from taskbalance.benchmarks.multimnist import (
    MultiFashionBenchmark,
    MultiFashionMNISTBenchmark,
    MultiMNISTBenchmark,
)


def test_names_and_mnist_family_classes() -> None:
    assert catalog.available() == [
        "multimnist",
        "multifashion",
        "multifashion_mnist",
        "qm9",
        "nyuv2",
        "cityscapes",
        "celeba",
    ]
    assert catalog.benchmark_class("multimnist") is MultiMNISTBenchmark
    assert catalog.benchmark_class("multifashion") is MultiFashionBenchmark
    assert catalog.benchmark_class("multifashion_mnist") is MultiFashionMNISTBenchmark


@pytest.mark.parametrize("name", list(catalog.BENCHMARKS))
def test_every_entry_resolves_to_a_benchmark_of_that_name(name: str) -> None:
    module = "taskbalance.benchmarks." + catalog.BENCHMARKS[name].split(":")[0]
    assert importlib.util.find_spec(module) is not None, f"{name}: the catalog names {module}, which does not exist"
    try:
        cls = catalog.benchmark_class(name)
    except ImportError as error:  # an optional dependency (torch_geometric, pillow) that CI does not install
        assert "pip install" in str(error), f"{name}: the ImportError should say what to install: {error}"
        pytest.skip(f"{name} needs an optional package: {error}")
    assert issubclass(cls, Benchmark)
    assert cls.name == name
    assert cls.default_protocol in cls.protocols


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'mnist'; choose from multimnist, multifashion"):
        catalog.benchmark_class("mnist")


def test_make_benchmark_passes_protocol() -> None:
    bench = catalog.make_benchmark("multimnist", protocol="paper")
    assert bench.protocol.name == "paper" and not bench.protocol.reduced
    with pytest.raises(ValueError, match="no protocol 'fast'; choose from paper, quick"):
        catalog.make_benchmark("multimnist", protocol="fast")
