#!/usr/bin/env bash
# Re-resolve constraints.txt: the newest versions inside pyproject.toml's ranges, installed into a
# throwaway venv (with the CPU torch of scripts/setup.sh) and frozen. Review the diff, then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
GHOSTSERVE_VENV="$tmp/venv" bash scripts/setup.sh --no-constraints
{
  sed -n '1,/^# Regenerate/p' constraints.txt
  "$tmp/venv/bin/pip" freeze --all --exclude-editable | grep -v -e '^torch==' -e '^ghostserve' -e '^#' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "[lock] constraints.txt rewritten: git diff constraints.txt"
