"""GF(2^8) arithmetic and the rs code checked against `galois`, an independent implementation."""

from __future__ import annotations

import itertools

import galois
import ghostserve.kernels as gk
import numpy as np
import pytest
from ghostserve.kernels import gf256
from hypothesis import given, settings
from hypothesis import strategies as st

GF = galois.GF(2**8, irreducible_poly=0x11D)


def galois_cauchy(n: int, m: int) -> np.ndarray:
    # ISA-L's gf_gen_cauchy1_matrix: row r, column j = 1 / ((n + r) + j), + being XOR in GF(2^8).
    x = GF(np.arange(n, n + m))[:, None]
    y = GF(np.arange(n))[None, :]
    return np.asarray(GF(1) / (x + y), dtype=np.uint8)


def test_mul_table_matches_galois() -> None:
    a = GF(np.arange(256))
    assert np.array_equal(gf256.mul_table(), np.asarray(a[:, None] * a[None, :], dtype=np.uint8))


def test_inverse_matches_galois() -> None:
    for x in range(1, 256):
        assert gf256.inv(x) == int(GF(1) / GF(x))
        assert gf256.mul(x, gf256.inv(x)) == 1
    with pytest.raises(ZeroDivisionError):
        gf256.inv(0)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (4, 2), (8, 3), (16, 8), (247, 8)])
def test_cauchy_matrix_matches_galois(n: int, m: int) -> None:
    assert np.array_equal(gf256.cauchy_parity(n, m), galois_cauchy(n, m))


def test_invert_matches_galois_and_rejects_singular() -> None:
    rng = np.random.default_rng(3)
    for size in (1, 2, 5, 12):
        while True:
            m = rng.integers(0, 256, (size, size), dtype=np.uint8)
            if np.linalg.det(GF(m)) != 0:
                break
        assert np.array_equal(gf256.invert(m), np.asarray(np.linalg.inv(GF(m)), dtype=np.uint8))
    with pytest.raises(ValueError, match="singular"):
        gf256.invert(np.array([[1, 2], [1, 2]], dtype=np.uint8))


@pytest.mark.parametrize(("n", "m"), [(3, 2), (4, 3), (2, 8)])
def test_decode_matrices_invert_every_erasure_pattern(n: int, m: int) -> None:
    gen = np.concatenate([np.eye(n, dtype=np.uint8), gf256.cauchy_parity(n, m)])
    for lost in itertools.chain.from_iterable(
        itertools.combinations(range(n + m), k) for k in range(1, m + 1)
    ):
        survivors = tuple(i for i in range(n + m) if i not in lost)[:n]
        dec = gf256.decode_matrix(n, m, survivors, tuple(lost))
        # Applying the decode rows to the survivors' generator rows must give the lost shards' rows.
        assert np.array_equal(np.asarray(GF(dec) @ GF(gen[list(survivors)])), gen[list(lost)])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 16), m=st.integers(1, 8), size=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_rs_parity_matches_galois(backend: str, n: int, m: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]
    parity = [np.empty(size, np.uint8) for _ in range(m)]
    gk.Codec("rs", n, m, backend=backend).encode(data, parity)
    expected = GF(galois_cauchy(n, m)) @ GF(np.stack(data).reshape(n, size))
    assert np.array_equal(np.stack(parity).reshape(m, size), np.asarray(expected, dtype=np.uint8))


def test_table_free_multiply_of_the_cuda_kernels() -> None:
    # Emulates gf_madd in codec_kernels.cu on packed 32-bit words: planes (w >> b) & 0x01010101 times
    # c * 2^b, XOR-accumulated, must equal the field product of every byte.
    coefs = np.arange(256, dtype=np.uint8)[:, None]
    table = gf256.bit_products(coefs)[:, 0, :].astype(np.uint32)  # [c][b]
    words = np.arange(256, dtype=np.uint32) * 0x01010101  # every byte value in all four lanes
    words ^= np.uint32(0x00FF5A00)  # and different bytes per lane
    acc = np.zeros((256, 256), dtype=np.uint32)
    for b in range(8):
        plane = (words >> np.uint32(b)) & np.uint32(0x01010101)
        acc ^= plane[None, :] * table[:, b][:, None]
    expected = gf256.mul_table()[np.arange(256)[:, None, None], words.view(np.uint8).reshape(256, 4)[None]]
    assert np.array_equal(acc.view(np.uint8).reshape(256, 256, 4), expected)
