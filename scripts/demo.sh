#!/usr/bin/env bash
# Set up (idempotent) and run the local demo: a protected request survives an injected GPU fault.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ghostserve demo "$@"
