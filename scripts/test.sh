#!/usr/bin/env bash
# Install taskbalance with its test dependencies into .venv (CPU torch first, so no CUDA build is pulled)
# and run the test suite. Used by the README's test command and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,rl,bench,lightning]"
# pure Python: lets the QM9 model tests run (qm9pack and rdkit, 100+ MB, stay optional; their tests use fixtures)
python -m pip install -q "torch_geometric>=2.4"
# torchjd with its UPGrad projector (small wheels): the speed benchmark's comparison is tested against it
python -m pip install -q "torchjd[quadprog-projector]>=0.18"
set +e
python -m pytest tests "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
