"""GF(2^8) arithmetic with the polynomial 0x11D and the Cauchy matrices of the `rs` code (pure, no I/O).

The parity matrix is ISA-L's `gf_gen_cauchy1_matrix` (entry `[r][j] = 1 / ((N + r) ^ j)`), so the ISA-L
fast path and every other backend produce the same parity bytes.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

POLY = 0x11D


def _tables() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32]]:
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    exp[255:510] = exp[0:255]
    return exp, log


EXP, LOG = _tables()


def mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return int(EXP[int(LOG[a]) + int(LOG[b])])


def inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(EXP[255 - int(LOG[a])])


@functools.cache
def mul_table() -> npt.NDArray[np.uint8]:
    """`mul_table()[a, b] = a * b`, 256x256 uint8 (read-only)."""
    a = np.arange(256)
    la = LOG[a]
    t = EXP[(la[:, None] + la[None, :]) % 255].astype(np.uint8)
    t[0, :] = 0
    t[:, 0] = 0
    t.flags.writeable = False
    return t


def matmul(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Matrix product over GF(2^8) of small matrices."""
    t = mul_table()
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.uint8)
    for k in range(a.shape[1]):
        out ^= t[a[:, k][:, None], b[k, :][None, :]]
    return out


def invert(m: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Inverse of a square matrix over GF(2^8) by Gauss–Jordan; ValueError if singular."""
    n = m.shape[0]
    t = mul_table()
    a = np.concatenate([m.astype(np.uint8), np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        pivots = np.flatnonzero(a[col:, col])
        if pivots.size == 0:
            raise ValueError("matrix is singular over GF(2^8)")
        p = col + int(pivots[0])
        if p != col:
            a[[col, p]] = a[[p, col]]
        a[col] = t[inv(int(a[col, col])), a[col]]
        for r in range(n):
            if r != col and a[r, col]:
                a[r] ^= t[int(a[r, col]), a[col]]
    return a[:, n:].copy()


@functools.cache
def cauchy_parity(n_data: int, n_parity: int) -> npt.NDArray[np.uint8]:
    """The `n_parity x n_data` parity rows of the systematic Cauchy generator (read-only)."""
    rows = np.arange(n_data, n_data + n_parity)[:, None]
    cols = np.arange(n_data)[None, :]
    out = np.array([[inv(int(x)) for x in row] for row in rows ^ cols], dtype=np.uint8)
    out.flags.writeable = False
    return out


def bit_products(matrix: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """`t[r, j, b] = matrix[r, j] * 2^b`: then `c * x = XOR_b bit_b(x) * t[b]`, the table-free multiply of
    the CUDA kernels (a byte plane of 0/1 times t[b] cannot carry into the next byte)."""
    powers = np.array([1 << b for b in range(8)], dtype=np.intp)
    out: npt.NDArray[np.uint8] = mul_table()[matrix.astype(np.intp)[:, :, None], powers[None, None, :]]
    return out.astype(np.uint8)


@functools.cache
def decode_matrix(
    n_data: int, n_parity: int, survivors: tuple[int, ...], targets: tuple[int, ...]
) -> npt.NDArray[np.uint8]:
    """Rows that rebuild shards `targets` from the `n_data` shards `survivors` (indices in the stripe).

    Cached per erasure pattern. `survivors` must be exactly `n_data` distinct indices.
    """
    gen = np.concatenate([np.eye(n_data, dtype=np.uint8), cauchy_parity(n_data, n_parity)], axis=0)
    inverse = invert(gen[list(survivors)])
    out = matmul(gen[list(targets)], inverse)
    out.flags.writeable = False
    return out
