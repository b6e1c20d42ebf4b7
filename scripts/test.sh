#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: lint, types, protos, CUDA compile, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
V=.venv/bin
echo "== ruff"; "$V/ruff" check .
echo "== mypy"; "$V/mypy" -p ghostserve.kernels -p ghostserve.sidecar -p ghostserve.engine -p ghostserve.operator -p ghostserve.cli
echo "== import contracts"; PYTHONPATH=kernels:protos:sidecar:engine:operator:cli "$V/lint-imports"
echo "== nvcc"; bash scripts/compile_cuda.sh
echo "== pytest"; "$V/python" -m pytest "$@"
