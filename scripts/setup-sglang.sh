#!/usr/bin/env bash
# Create or reuse .venv-sglang: sglang 0.5.23 with --no-deps, the light packages its mem_cache, managers
# and plugin modules import, and GhostServe (editable) -- for tests/sglang on a CPU-only machine.
#
# sglang 0.5.23 pins torch 2.14.1 and imports torchvision (a CUDA build on PyPI, which does not load
# beside GhostServe's CPU torch 2.13.0 in .venv), so the plugin's tests need this second environment.
# The CUDA torch wheel imports and runs on CPU. sglang's full dependency list (flashinfer, deep-gemm,
# xgrammar, ...) is never installed. Re-running is cheap: skipped while this script and
# pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GHOSTSERVE_SGLANG_VENV:-.venv-sglang}
TORCH="torch==2.14.1"
# What `import sglang.srt.managers.scheduler` (and the plugin) needs on CPU, pinned where sglang pins.
LIGHT=(
  "torchvision==0.29.1" "transformers==5.19.0" "tokenizers==0.23.2" "sentencepiece==0.2.1"
  "compressed-tensors==0.18.0" "apache-tvm-ffi==0.1.11" "openai==2.8.0"
  safetensors orjson psutil pybase64 requests starlette anyio msgspec pydantic pyzmq tqdm IPython dill
  gguf einops aiohttp fastapi uvicorn partial_json_parser setproctitle
)
# What `python -m sglang.launch_server` needs on top to serve on CPU (tests/sglang/test_real_server.py).
# xgrammar without its dependencies: they are the light ones above, plus torch.
SERVE=("uvloop==0.23.0" "soundfile==0.13.1" "python-multipart==0.0.34")
SERVE_NODEPS=("xgrammar==0.2.7")

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-sglang] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ghostserve-sglang-installed"
want="$(sha256sum pyproject.toml scripts/setup-sglang.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
PIP=("$VENV/bin/pip" install -q)
echo "[setup-sglang] installing into $VENV ($TORCH, sglang==0.5.23 --no-deps)"
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "$TORCH"
"${PIP[@]}" --no-deps "sglang==0.5.23"
# torch is named in every later call so that no resolver can move it.
"${PIP[@]}" "$TORCH" "${LIGHT[@]}"
"${PIP[@]}" "$TORCH" "${SERVE[@]}"
"${PIP[@]}" --no-deps "${SERVE_NODEPS[@]}"
"${PIP[@]}" "$TORCH" -e ".[dev]"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.14.1"), torch.__version__
assert md.version("sglang") == "0.5.23"
names = [ep.name for ep in md.entry_points(group="sglang.srt.plugins")]
assert "ghostserve" in names, names
# Everything the plugin and its tests import: fails here, not in the tests, if a light dependency is missing.
import sglang.srt.managers.io_struct, sglang.srt.managers.scheduler, sglang.srt.managers.tp_worker  # noqa
import sglang.srt.mem_cache.allocator.paged, sglang.srt.mem_cache.common, sglang.srt.mem_cache.radix_cache  # noqa
import ghostserve.engine.sglang.plugin, ghostserve.engine.sglang.resume  # noqa
import sglang.launch_server, uvloop, xgrammar, soundfile, multipart  # noqa
PY
echo "$want" > "$stamp"
