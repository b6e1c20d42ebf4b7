"""Run the CUDA kernels of codec_kernels.cu on the CPU: compile the source with g++ under a small shim
(one thread per block, blocks run one after another) and call the kernels through ctypes.

This checks the kernels' logic — indexing, the table-free GF(2^8) multiply, the fused gather, the
unrolled loop's bounds, the byte tail — where no GPU exists. It cannot check GPU-only behaviour (memory
model, occupancy, speed); the gpu-marked tests do that on a GPU.
"""

from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess
from collections.abc import Sequence

import ghostserve.kernels
import numpy as np

SOURCE = pathlib.Path(ghostserve.kernels.__file__).with_name("codec_kernels.cu")

SHIM = r"""
#include <cstdint>
#include <cstring>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
struct uint4 { unsigned int x, y, z, w; };
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
static inline uint4 __ldg(const uint4* p) { uint4 v; std::memcpy(&v, p, sizeof v); return v; }
static inline void __syncthreads() {}
struct Dim { unsigned int x = 0, y = 0, z = 0; };
static Dim threadIdx, blockIdx, blockDim, gridDim;
alignas(16) static unsigned char emu_dynamic_shared[1 << 16];
extern "C" void emu_block(unsigned int block, unsigned int grid) {
  threadIdx.x = 0; blockDim.x = 1; blockIdx.x = block; gridDim.x = grid;
}
"""


def build(workdir: pathlib.Path) -> ctypes.CDLL | None:
    """Compile the kernels for the CPU into `workdir`; None when no C++ compiler is installed."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    text = SOURCE.read_text().replace(
        "extern __shared__ uint8_t s_tbl[];", "uint8_t* s_tbl = emu_dynamic_shared;"
    )
    assert "emu_dynamic_shared" in text, "codec_kernels.cu no longer declares its dynamic shared table"
    src = workdir / "emu.cpp"
    src.write_text(SHIM + text)
    lib = workdir / "emu.so"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", str(src), "-o", str(lib)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return ctypes.CDLL(str(lib))


def ptrs(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([a.ctypes.data for a in arrays], dtype=np.uint64)


def launch(lib: ctypes.CDLL, name: str, args: Sequence[object], grid: int = 3) -> None:
    """Run kernel `name` over `grid` one-thread blocks (the grid-stride loops then cover everything)."""
    fn = getattr(lib, name)
    for block in range(grid):
        lib.emu_block(block, grid)
        fn(*args)
