#!/usr/bin/env bash
# Compile every CUDA source with nvcc for Hopper and print the resource usage (registers, shared memory,
# spills). Nothing runs here; GPU tests run the same sources through CuPy where a GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: CUDA sources not compiled"; exit 0
fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
shopt -s nullglob
for cu in kernels/ghostserve/kernels/*.cu; do
  echo "-- $cu"
  nvcc -arch=sm_90 -std=c++17 -O3 --resource-usage -Xptxas -warn-spills -cubin -o "$out/$(basename "$cu" .cu).cubin" "$cu"
done
