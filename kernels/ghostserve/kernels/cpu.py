"""CPU backend: cache-blocked NumPy on uint64 words, with ISA-L (GF(2^8) sums, aligned XOR) where installed.

XOR runs as `np.bitwise_xor(..., out=)` over blocks of `BLOCK_BYTES` so the accumulator stays in cache and
no temporaries are made. The NumPy GF(2^8) multiply looks up byte *pairs* in a 64 Ki-entry uint16 table per
coefficient (one `np.take` handles two bytes); ISA-L, when present, does the same sums with SIMD.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import errors, gf256, isal
from ghostserve.kernels import layout as kvlayout

BLOCK_BYTES = 256 * 1024
ALIGN = 64  # a cache line, and more than ISA-L's SIMD paths ask for (32 bytes)
U8 = npt.NDArray[np.uint8]


def aligned_empty(nbytes: int, *, zero: bool = False) -> U8:
    """A fresh uint8 buffer whose first byte sits on an `ALIGN`-byte boundary.

    NumPy's large allocations start 16 bytes into their mmap'd block, so ISA-L's xor_gen (32-byte aligned
    starts only) never ran on them and XOR fell back to NumPy: about 17% of a chunk's encode on the
    reference machine. Codec scratch and the sidecar's parity and rebuild buffers come from here.
    """
    raw = np.zeros(nbytes + ALIGN, np.uint8) if zero else np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    out: U8 = raw[start : start + nbytes]
    return out


def host_bytes(buf: Any, *, what: str, writable: bool) -> U8:
    """Flat uint8 numpy view of a host buffer (numpy array, bytes-like, CPU torch tensor), no copy."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise errors.ShardTypeError(
                f"{what} must be C-contiguous (shape {buf.shape}, strides {buf.strides})"
            )
        if writable and not buf.flags.writeable:
            raise errors.ShardTypeError(f"{what} is read-only")
        return buf.reshape(-1).view(np.uint8)
    if isinstance(buf, bytes | bytearray | memoryview):
        mv = memoryview(buf)
        if not mv.c_contiguous:
            raise errors.ShardTypeError(f"{what} must be C-contiguous")
        if writable and mv.readonly:
            raise errors.ShardTypeError(f"{what} is read-only ({type(buf).__name__})")
        return np.frombuffer(mv.cast("B"), dtype=np.uint8)
    module = type(buf).__module__.split(".")[0]
    if module == "torch":
        if buf.device.type != "cpu":
            raise errors.ShardTypeError(f"{what} is on {buf.device}; the cpu backend needs host memory")
        if not buf.is_contiguous():
            raise errors.ShardTypeError(f"{what} must be contiguous")
        import torch

        flat = buf.detach().reshape(-1)
        out: U8 = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
        return out
    if module == "cupy":
        raise errors.ShardTypeError(f"{what} is a cupy array; the cpu backend needs host memory")
    raise errors.ShardTypeError(f"{what} has unsupported type {type(buf).__name__}")


@functools.cache
def pair_table(coef: int) -> npt.NDArray[np.uint16]:
    """`t[x] = coef * (x & 0xFF) | (coef * (x >> 8)) << 8`: multiplies two packed bytes per lookup."""
    row = gf256.mul_table()[coef].astype(np.uint16)
    x = np.arange(65536)
    # Little-endian uint16 view: the low byte is the first byte in memory.
    return row[x & 0xFF] | (row[x >> 8] << 8)


def _xor_blocked(out: U8, srcs: Sequence[U8]) -> None:
    n = out.size
    words = n // 8
    if words:
        o64 = out[: words * 8].view(np.uint64)
        s64 = [s[: words * 8].view(np.uint64) for s in srcs]
        step = BLOCK_BYTES // 8
        for a in range(0, words, step):
            b = min(a + step, words)
            dst = o64[a:b]
            if len(s64) == 1:
                np.copyto(dst, s64[0][a:b])
                continue
            np.bitwise_xor(s64[0][a:b], s64[1][a:b], out=dst)
            for w in s64[2:]:
                np.bitwise_xor(dst, w[a:b], out=dst)
    if n % 8:
        rest = out[words * 8 :]
        np.copyto(rest, srcs[0][words * 8 :])
        for s in srcs[1:]:
            np.bitwise_xor(rest, s[words * 8 :], out=rest)


def _gf_combine_numpy(matrix: U8, srcs: Sequence[U8], outs: Sequence[U8]) -> None:
    n = outs[0].size
    pairs = n // 2
    step = BLOCK_BYTES // 4
    scratch = np.empty(min(step, pairs), dtype=np.uint16)
    mt = gf256.mul_table()
    for r, out in enumerate(outs):
        coefs = [int(c) for c in matrix[r]]
        live = [(c, s) for c, s in zip(coefs, srcs, strict=True) if c]
        if not live:
            out[:] = 0
            continue
        if pairs:
            o16 = out[: pairs * 2].view(np.uint16)
            s16 = [(pair_table(c) if c != 1 else None, s[: pairs * 2].view(np.uint16)) for c, s in live]
            for a in range(0, pairs, step):
                b = min(a + step, pairs)
                dst = o16[a:b]
                tmp = scratch[: b - a]
                for i, (tbl, src) in enumerate(s16):
                    if tbl is None:  # coefficient 1: plain XOR, no lookup
                        if i == 0:
                            np.copyto(dst, src[a:b])
                        else:
                            np.bitwise_xor(dst, src[a:b], out=dst)
                    elif i == 0:
                        np.take(tbl, src[a:b], out=dst, mode="wrap")
                    else:
                        np.take(tbl, src[a:b], out=tmp, mode="wrap")
                        np.bitwise_xor(dst, tmp, out=dst)
        if n % 2:
            acc = 0
            for c, s in live:
                acc ^= int(mt[c, int(s[n - 1])])
            out[n - 1] = acc


class CpuBackend:
    """Host memory. `use_isal=None` picks ISA-L when it loads; False forces the NumPy path."""

    # Measured on a shared 2-core EPYC: per-call overhead dominates below ~256 KiB per row chunk. Each
    # gather block costs ~10 GIL hand-offs (a take and a hash per shard, the XOR), and with two encode
    # threads beside the gRPC threads a hand-off can cost ~0.1 ms: 1 MiB blocks encode ~2x faster than
    # 256 KiB ones (bench/sidecar.py, both the bare codec and the sidecar), though they spill L2.
    rdp_chunk_bytes = 1024 * 1024
    gather_block_bytes = 1024 * 1024

    def __init__(self, *, use_isal: bool | None = None) -> None:
        lib = isal.load() if use_isal is not False else None
        if use_isal and lib is None:
            raise errors.CodecError("ISA-L was requested but libisal could not be loaded")
        self._isal = lib
        self.name = "cpu" if lib is not None else "numpy"

    @property
    def isal(self) -> bool:
        return self._isal is not None

    def as_bytes(self, buf: Any, *, what: str, writable: bool) -> U8:
        return host_bytes(buf, what=what, writable=writable)

    def device(self, view: Any) -> str:
        return "cpu"

    def empty(self, nbytes: int, *, like: Any) -> U8:
        return aligned_empty(nbytes)

    def xor(self, out: U8, srcs: Sequence[U8]) -> None:
        n = out.size
        lib = self._isal
        # ISA-L's xor_gen wants 32-byte aligned starts and a multiple of 32 bytes: it takes that prefix.
        bulk = n // 32 * 32 if lib is not None and len(srcs) >= 2 else 0
        # Each address is read once (a ctypes round trip per array), for the check and for the call.
        addresses = [v.ctypes.data for v in (*srcs, out)] if bulk else []
        if lib is not None and bulk and all(a % 32 == 0 for a in addresses):
            for a in range(0, bulk, isal.MAX_CALL_BYTES):
                b = min(a + isal.MAX_CALL_BYTES, bulk)
                lib.xor_gen_at([x + a for x in addresses], b - a)
            if bulk < n:
                _xor_blocked(out[bulk:], [s[bulk:] for s in srcs])
            return
        _xor_blocked(out, srcs)

    def gf_combine(self, matrix: U8, srcs: Sequence[U8], outs: Sequence[U8]) -> None:
        n = outs[0].size
        if n == 0:
            return
        if self._isal is None:
            _gf_combine_numpy(matrix, srcs, outs)
            return
        for a in range(0, n, isal.MAX_CALL_BYTES):
            b = min(a + isal.MAX_CALL_BYTES, n)
            self._isal.encode(matrix, [s[a:b] for s in srcs], [o[a:b] for o in outs])

    def equal(self, a: U8, b: U8) -> bool:
        return bool(np.array_equal(a, b))

    def gather(
        self, pool: U8, layout: kvlayout.KVLayout, rows: npt.NDArray[np.int64], start: int, out: U8
    ) -> None:
        kvlayout.gather_range(pool, layout, rows, start, out)
