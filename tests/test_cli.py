"""The command line's core: ``--version``, and a torch-only install (numpy, tqdm and matplotlib absent) that still
imports the library, trains with a method and lists the methods, while the benchmarks say what to install."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import taskbalance
from taskbalance import cli

#: installed first in a subprocess: numpy, tqdm and matplotlib then fail to import as modules that are not installed
BLOCK_BENCH_EXTRAS = """
import sys

class BlockBenchExtras:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"numpy", "tqdm", "matplotlib"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, BlockBenchExtras())
"""


def run_without_extras(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_BENCH_EXTRAS + code, *args], capture_output=True, text=True, check=False
    )


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    try:
        expected = importlib.metadata.version("taskbalance")
    except importlib.metadata.PackageNotFoundError:
        expected = taskbalance.__version__
    assert capsys.readouterr().out == f"taskbalance {expected}\n"


def test_version_falls_back_to_the_package_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == taskbalance.__version__


def test_the_core_needs_torch_alone() -> None:
    done = run_without_extras(
        """
import torch
import taskbalance as tb

torch.manual_seed(0)
encoder, heads = torch.nn.Linear(4, 8), [torch.nn.Linear(8, 1) for _ in range(2)]
balancer = tb.make("igbv1+nashmtl", n_tasks=2)
x, y = torch.randn(16, 4), torch.randn(16, 2)
for _ in range(3):
    features = encoder(x)
    losses = torch.stack([(head(features).squeeze(1) - y[:, k]).pow(2).mean() for k, head in enumerate(heads)])
    result = balancer.backward(losses, shared_params=encoder.parameters(), features=features)
    assert torch.isfinite(result.weights).all()
    assert encoder.weight.grad is not None and torch.isfinite(encoder.weight.grad).all()
    encoder.zero_grad()
assert not any(name.partition(".")[0] in {"numpy", "tqdm", "matplotlib"} for name in sys.modules)
print("trained")
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "trained"


@pytest.mark.parametrize(("argv", "expected"), [(["methods"], "igbv1"), (["--version"], "taskbalance ")])
def test_the_command_line_needs_torch_alone(argv: list[str], expected: str) -> None:
    done = run_without_extras("import runpy; runpy.run_module('taskbalance', run_name='__main__')", *argv)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_the_benchmarks_name_their_install_command() -> None:
    done = run_without_extras("import taskbalance.benchmarks.datasets")
    assert done.returncode != 0
    assert "pip install 'taskbalance[bench]'" in done.stderr and "numpy" in done.stderr
    done = run_without_extras("from taskbalance import cli; sys.exit(cli.main(['run', 'multimnist']))")
    assert done.returncode == 2
    assert "pip install 'taskbalance[bench]'" in done.stderr
