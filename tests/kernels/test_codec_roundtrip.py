"""Property tests: every code on every backend rebuilds every erasure pattern bit for bit, and every
backend's parity equals the NumPy oracle's."""

from __future__ import annotations

import itertools
import math

import ghostserve.kernels as gk
import kv_testdata
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_testdata import empty_like_backend, to_host


def erasure_patterns(
    n_shards: int, m: int, rng: np.random.Generator, limit: int = 40
) -> list[tuple[int, ...]]:
    """Every pattern of 1..m losses when there are at most `limit`, else `limit` random ones of each size."""
    total = sum(math.comb(n_shards, k) for k in range(1, m + 1))
    if total <= limit:
        return [c for k in range(1, m + 1) for c in itertools.combinations(range(n_shards), k)]
    return [
        tuple(sorted(rng.choice(n_shards, k, replace=False).tolist()))
        for k in range(1, m + 1)
        for _ in range(max(1, limit // m))
    ]


def oracle_parity(code: str, n: int, m: int, data: list[np.ndarray]) -> list[np.ndarray]:
    parity = [np.empty(data[0].size, np.uint8) for _ in range(m)]
    gk.Codec(code, n, m, backend="numpy").encode(data, parity)
    return parity


def check_round_trip(
    code: str, n: int, m: int | None, nbytes: int, dtype: str, seed: int, backend: str, *, limit: int = 40
) -> None:
    codec = gk.Codec(code, n, m, backend=backend)
    m = codec.n_parity
    rng = np.random.default_rng(seed)
    raw = [kv_testdata.shard_bytes(rng, dtype, nbytes) for _ in range(n)]
    data = [kv_testdata.typed(r, dtype, backend) for r in raw]
    parity = [empty_like_backend(nbytes, backend) for _ in range(m)]
    codec.encode(data, parity)
    expected = oracle_parity(code, n, m, raw)
    for i, (got, want) in enumerate(zip(parity, expected, strict=True)):
        assert np.array_equal(to_host(got), want), f"parity {i} differs from the numpy oracle"
    assert codec.verify(data, parity)
    full = [*data, *parity]
    host = [*raw, *expected]
    for lost in erasure_patterns(n + m, m, rng, limit):
        shards = [None if i in lost else s for i, s in enumerate(full)]
        out = {i: empty_like_backend(nbytes, backend) for i in lost}
        codec.reconstruct(shards, out=out)
        for i in lost:
            assert np.array_equal(to_host(out[i]), host[i]), f"shard {i} wrong after losing {lost}"


@settings(max_examples=30, deadline=None)
@given(
    code_m=st.sampled_from([("xor", 1), ("rdp", 2), ("rs", 1), ("rs", 2), ("rs", 3), ("rs", 4), ("rs", 8)]),
    n=st.integers(1, 16),
    elems=st.one_of(st.integers(0, 70), st.integers(70, 5000)),
    dtype=st.sampled_from(sorted(kv_testdata.ITEMSIZE)),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(
    backend: str, code_m: tuple[str, int], n: int, elems: int, dtype: str, seed: int
) -> None:
    code, m = code_m
    check_round_trip(code, n, m, elems * kv_testdata.ITEMSIZE[dtype], dtype, seed, backend)


@pytest.mark.parametrize("code", ["xor", "rdp", "rs"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_exhaustive_small_stripes(backend: str, code: str, n: int) -> None:
    # Sizes straddling RDP's row split (p - 1 rows + tail) and the 8-byte word; every pattern is tried.
    for nbytes in (1, 9, 4 * 7 + 3, 1031):
        check_round_trip(code, n, 3 if code == "rs" else None, nbytes, "uint8", nbytes * 31 + n, backend)


def test_large_shard_crosses_cache_blocks(backend: str) -> None:
    # Several 256 KiB blocks plus a ragged tail: the blocked loops must not lose or repeat bytes.
    for code in ("xor", "rdp", "rs"):
        nbytes = 3 * 256 * 1024 + 13
        check_round_trip(code, 4, 2 if code == "rs" else None, nbytes, "uint8", 5, backend, limit=4)


def test_torch_tensors_of_every_dtype_on_the_cpu_backend() -> None:
    torch = pytest.importorskip("torch")
    codec = gk.Codec("rs", 3, 2)
    rng = np.random.default_rng(9)
    for dtype in ("float16", "bfloat16", "float32", "float8"):
        raw = [kv_testdata.shard_bytes(rng, dtype, 64) for _ in range(3)]
        data = [kv_testdata.typed(r, dtype, "torch") for r in raw]
        parity = [torch.empty(64, dtype=torch.uint8) for _ in range(2)]
        codec.encode(data, parity)
        assert all(
            np.array_equal(p.numpy(), e) for p, e in zip(parity, oracle_parity("rs", 3, 2, raw), strict=True)
        )
        out = torch.zeros_like(data[1])
        codec.reconstruct([data[0], None, data[2], parity[0], None], out={1: out})
        assert out.dtype == data[1].dtype and np.array_equal(to_host(out), raw[1])


@pytest.mark.parametrize("code", ["xor", "rdp", "rs"])
def test_reconstruct_only_what_is_asked(code: str) -> None:
    codec = gk.Codec(code, 4, 3 if code == "rs" else None)
    m = codec.n_parity
    rng = np.random.default_rng(2)
    data = [rng.integers(0, 256, 1000, dtype=np.uint8) for _ in range(4)]
    parity = oracle_parity(code, 4, m, data)
    lost = [1, 4 + m - 1] if m > 1 else [1]  # a data shard and (where M allows) the last parity shard
    shards = [None if i in lost else s for i, s in enumerate([*data, *parity])]
    out = np.zeros(1000, np.uint8)
    codec.reconstruct(shards, out={1: out})
    assert np.array_equal(out, data[1])


@pytest.mark.parametrize("code", ["xor", "rdp", "rs"])
def test_nothing_lost_is_a_no_op(code: str) -> None:
    """With every shard present reconstruct changes no byte, yet still validates the stripe."""
    codec = gk.Codec(code, 3)
    rng = np.random.default_rng(7)
    data = [rng.integers(0, 256, 64, dtype=np.uint8) for _ in range(3)]
    stripe = [*data, *oracle_parity(code, 3, codec.n_parity, data)]
    before = [s.copy() for s in stripe]
    codec.reconstruct(stripe)
    codec.reconstruct(stripe, out={})
    assert all(np.array_equal(s, b) for s, b in zip(stripe, before, strict=True))
    with pytest.raises(gk.CodecError, match="shard 0 is present"):
        codec.reconstruct(stripe, out={0: np.zeros(64, np.uint8)})
    with pytest.raises(gk.ShardSizeError):
        codec.reconstruct([*stripe[:-1], stripe[-1][:32]])
    assert all(np.array_equal(s, b) for s, b in zip(stripe, before, strict=True))


def test_out_accepts_numpy_integer_indices() -> None:
    codec = gk.Codec("rs", 3, 2)
    data = [np.arange(40, dtype=np.uint8) * (i + 1) for i in range(3)]
    parity = oracle_parity("rs", 3, 2, data)
    out = np.zeros(40, np.uint8)
    codec.reconstruct([data[0], None, data[2], *parity], out={np.int64(1): out})  # type: ignore[dict-item]
    assert np.array_equal(out, data[1])
