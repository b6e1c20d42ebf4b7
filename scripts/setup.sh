#!/usr/bin/env bash
# Create or reuse .venv with GhostServe and its dependencies (CPU build of torch, never the CUDA stack),
# pinned by constraints.txt. Re-running is cheap: skipped while pyproject.toml, constraints.txt and this
# script are unchanged. Quiet unless something fails (then pip's log is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GHOSTSERVE_VENV:-.venv}
TORCH_VERSION=${GHOSTSERVE_TORCH:-2.13.0}
PINS=(-c constraints.txt)
if [ "${1:-}" = "--no-constraints" ]; then PINS=(); fi  # scripts/lock.sh: resolve the ranges afresh

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# ISA-L gives the CPU codec its fast Reed-Solomon path (ctypes; the NumPy path works without it).
if ! ldconfig -p 2>/dev/null | grep -q 'libisal\.so\.2'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing libisal2 (ISA-L)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libisal2) >/dev/null \
      || echo "[setup] libisal2 not installed: the CPU codec uses its NumPy path"
  else
    echo "[setup] libisal2 missing (install it for fast RS on CPU): using the NumPy path"
  fi
fi
stamp="$VENV/.ghostserve-installed"
want="$(sha256sum pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into $VENV (torch==$TORCH_VERSION CPU build${PINS:+, pinned by constraints.txt})"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
pip_q() {
  if ! PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "$VENV/bin/pip" install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "[setup] pip install $* failed" >&2
    exit 1
  fi
}
pip_q "${PINS[@]}" --upgrade pip setuptools wheel
# Pinned first so nothing later can resolve an unpinned torch to a CUDA build.
# GHOSTSERVE_TORCH_INDEX may name a CPU wheel index on machines whose default index serves CUDA builds.
if [ -n "${GHOSTSERVE_TORCH_INDEX:-}" ]; then
  pip_q "torch==$TORCH_VERSION" --index-url "$GHOSTSERVE_TORCH_INDEX"
else
  pip_q "torch==$TORCH_VERSION"
fi
pip_q "${PINS[@]}" "torch==$TORCH_VERSION" -e ".[dev]"
echo "$want" > "$stamp"
