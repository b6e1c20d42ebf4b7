"""The CUDA kernels' logic, run on the CPU (see cuda_emulation.py), against the NumPy codec."""

from __future__ import annotations

import ctypes
import pathlib

import cuda_emulation as emu
import ghostserve.kernels as gk
import numpy as np
import pytest
from ghostserve.kernels import gf256

U64 = ctypes.c_uint64
I32 = ctypes.c_int32
U32 = ctypes.c_uint32
P = ctypes.c_void_p


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    built = emu.build(pathlib.Path(tmp_path_factory.mktemp("cuda-emu")))
    if built is None:
        pytest.skip("no C++ compiler to emulate the CUDA kernels")
    return built


def aligned(nbytes: int, offset: int = 0) -> np.ndarray:
    raw = np.zeros(nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 16 + offset
    return raw[start : start + nbytes]


@pytest.mark.parametrize("offset", [0, 3])  # 3: misaligned, the byte-wise path does everything
@pytest.mark.parametrize("nbytes", [1, 16, 47, 4096 + 9])
@pytest.mark.parametrize(("n", "m"), [(4, 1), (4, 2), (3, 3), (10, 8), (1, 5)])
def test_gf_kernels_match_numpy(lib: ctypes.CDLL, n: int, m: int, nbytes: int, offset: int) -> None:
    rng = np.random.default_rng(n * 100 + m)
    data = [aligned(nbytes, offset) for _ in range(n)]
    for d in data:
        d[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    parity = [aligned(nbytes, offset) for _ in range(m)]
    matrix = gf256.cauchy_parity(n, m)
    tbl = np.ascontiguousarray(gf256.bit_products(matrix).reshape(-1))
    src, dst = emu.ptrs(data), emu.ptrs(parity)
    aligned_flag = int(offset == 0)
    args = [
        P(src.ctypes.data),
        I32(n),
        P(dst.ctypes.data),
        P(tbl.ctypes.data),
        U64(nbytes),
        I32(aligned_flag),
    ]
    emu.launch(lib, f"gs_gf_{m}", args)
    want = [np.empty(nbytes, np.uint8) for _ in range(m)]
    gk.Codec("rs", n, m, backend="numpy").encode(data, want)
    for r in range(m):
        assert np.array_equal(parity[r], want[r]), (r, nbytes, offset)


@pytest.mark.parametrize("nbytes", [5, 32, 4096 + 17])
@pytest.mark.parametrize("nsrc", [1, 2, 7])
def test_xor_kernel_matches_numpy(lib: ctypes.CDLL, nsrc: int, nbytes: int) -> None:
    rng = np.random.default_rng(nsrc)
    srcs = [aligned(nbytes) for _ in range(nsrc)]
    for s in srcs:
        s[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    out = aligned(nbytes)
    sp, op = emu.ptrs(srcs), emu.ptrs([out])
    emu.launch(lib, "gs_xor", [P(sp.ctypes.data), I32(nsrc), P(op.ctypes.data), U64(nbytes), I32(1)])
    assert np.array_equal(out, np.bitwise_xor.reduce(np.stack(srcs), axis=0))


@pytest.mark.parametrize(("code", "m"), [("xor", 1), ("rs", 2), ("rs", 4)])
def test_fused_gather_kernels_match_gather_then_encode(lib: ctypes.CDLL, code: str, m: int) -> None:
    layout = gk.KVLayout(
        layers=3, kv_heads=2, head_dim=8, dtype="float16", page_size=1, pool_slots=40
    )  # 32 B rows
    n = 3
    rng = np.random.default_rng(m)
    pools = [aligned(layout.pool_nbytes) for _ in range(n)]
    for p in pools:
        p[:] = rng.integers(0, 256, layout.pool_nbytes, dtype=np.uint8)
    slots = rng.permutation(layout.pool_slots)[:13].astype(np.int64)
    size = layout.shard_nbytes(slots.size)
    parity = [aligned(size) for _ in range(m)]
    pp, op = emu.ptrs(pools), emu.ptrs(parity)
    geometry = [U32(layout.row_bytes // 16), U32(slots.size), U64(layout.pool_slots), P(slots.ctypes.data)]
    if code == "xor":
        emu.launch(lib, "gs_xor_gather", [P(pp.ctypes.data), I32(n), P(op.ctypes.data), U64(size), *geometry])
    else:
        tbl = np.ascontiguousarray(gf256.bit_products(gf256.cauchy_parity(n, m)).reshape(-1))
        args = [P(pp.ctypes.data), I32(n), P(op.ctypes.data), P(tbl.ctypes.data), U64(size), *geometry]
        emu.launch(lib, f"gs_gf_gather_{m}", args)
    shards = [np.empty(size, np.uint8) for _ in range(n)]
    for pool, shard in zip(pools, shards, strict=True):
        gk.gather_shard(pool, layout, slots, shard)
    want = [np.empty(size, np.uint8) for _ in range(m)]
    gk.Codec(code, n, m, backend="numpy").encode(shards, want)
    for r in range(m):
        assert np.array_equal(parity[r], want[r]), r
