"""Optional ctypes binding to Intel ISA-L (Debian `libisal2`): the CPU fast path and the benchmark baseline.

Only plain C calls with caller-owned buffers: `ec_init_tables` once per coefficient matrix (cached), then
`ec_encode_data` over the whole shard length; `xor_gen` for the XOR baseline. `load()` returns None when the
library is missing or `GHOSTSERVE_ISAL=0`, and callers fall back to NumPy (bit-identical by construction:
same field polynomial 0x11D, same matrices).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_CANDIDATES = ("libisal.so.2", "libisal.so")


class Isal:
    """A loaded libisal. Methods take flat uint8 numpy arrays and write into the given outputs."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ec_init_tables.restype = None
        lib.ec_encode_data.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.ec_encode_data.restype = None
        lib.xor_gen.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        lib.xor_gen.restype = ctypes.c_int
        self._tables: dict[bytes, npt.NDArray[np.uint8]] = {}

    def tables(self, matrix: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """ISA-L's expanded multiply tables for `matrix` (rows x k), cached by content."""
        key = matrix.shape[0].to_bytes(2, "little") + matrix.tobytes()
        cached = self._tables.get(key)
        if cached is None:
            rows, k = matrix.shape
            flat = np.ascontiguousarray(matrix, dtype=np.uint8)
            cached = np.empty(32 * k * rows, dtype=np.uint8)
            self._lib.ec_init_tables(k, rows, flat.ctypes.data, cached.ctypes.data)
            self._tables[key] = cached
        return cached

    def encode(
        self,
        matrix: npt.NDArray[np.uint8],
        srcs: Sequence[npt.NDArray[np.uint8]],
        outs: Sequence[npt.NDArray[np.uint8]],
    ) -> None:
        """`outs[r] = XOR_j matrix[r, j] * srcs[j]`; all arrays flat uint8 of one length (< 2 GiB)."""
        length = outs[0].size
        tbl = self.tables(matrix)
        src_ptrs = (ctypes.c_void_p * len(srcs))(*(s.ctypes.data for s in srcs))
        out_ptrs = (ctypes.c_void_p * len(outs))(*(o.ctypes.data for o in outs))
        self._lib.ec_encode_data(length, len(srcs), len(outs), tbl.ctypes.data, src_ptrs, out_ptrs)

    def xor_gen(self, srcs: Sequence[npt.NDArray[np.uint8]], out: npt.NDArray[np.uint8]) -> None:
        """`out = XOR srcs` with ISA-L; needs 32-byte aligned buffers and a multiple of 32 bytes."""
        self.xor_gen_at([v.ctypes.data for v in (*srcs, out)], out.size)

    def xor_gen_at(self, addresses: Sequence[int], length: int) -> None:
        """`xor_gen` on raw addresses (sources, then the output), for callers that already hold them."""
        ptrs = (ctypes.c_void_p * len(addresses))(*addresses)
        if self._lib.xor_gen(len(addresses), length, ptrs) != 0:
            raise ValueError("ISA-L xor_gen rejected the buffers (alignment or length)")


# ISA-L takes an int length: split longer buffers so a 2 GiB+ shard still works.
MAX_CALL_BYTES = 1 << 30


@functools.cache
def load() -> Isal | None:
    """The ISA-L binding, or None when libisal is not installed or `GHOSTSERVE_ISAL=0`."""
    if os.environ.get("GHOSTSERVE_ISAL", "1") == "0":
        return None
    names = [*_CANDIDATES]
    found = ctypes.util.find_library("isal")
    if found:
        names.insert(0, found)
    for name in names:
        try:
            return Isal(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None
