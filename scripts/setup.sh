#!/usr/bin/env bash
# Create or reuse .venv with GhostServe and its dependencies (CPU build of torch, never the CUDA stack).
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GHOSTSERVE_VENV:-.venv}
TORCH_VERSION=${GHOSTSERVE_TORCH:-2.13.0}

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
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into $VENV (torch==$TORCH_VERSION CPU build)"
"$VENV/bin/pip" install -q --upgrade pip setuptools wheel
# Pinned first so nothing later can resolve an unpinned torch to a CUDA build.
# GHOSTSERVE_TORCH_INDEX may name a CPU wheel index on machines whose default index serves CUDA builds.
if [ -n "${GHOSTSERVE_TORCH_INDEX:-}" ]; then
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" --index-url "$GHOSTSERVE_TORCH_INDEX"
else
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi
"$VENV/bin/pip" install -q -e ".[dev]"
echo "$want" > "$stamp"
