#!/usr/bin/env bash
# Set up (idempotent) and run the demo on the embedded cluster (docs/cluster.md): the operator, a sidecar per
# node and the reference engine in pods survive GPU faults mid-decode with identical output.
# `--no-cluster` runs the engine-only demo instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ghostserve demo "$@"
