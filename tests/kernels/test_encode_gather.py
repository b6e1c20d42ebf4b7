"""encode_gather equals gather_shard + encode for every code and backend, across block boundaries."""

from __future__ import annotations

import ghostserve.kernels as gk
import numpy as np
import pytest
from ghostserve.kernels import cpu
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_testdata import empty_like_backend, to_backend, to_host

LAYOUTS = [
    gk.KVLayout(layers=2, kv_heads=2, head_dim=8, dtype="bfloat16", page_size=16, pool_slots=64),
    gk.KVLayout(layers=3, kv_heads=1, head_dim=7, dtype="float8", page_size=1, pool_slots=50),  # odd rows
    gk.KVLayout(layers=1, kv_heads=4, head_dim=16, dtype="float32", page_size=4, pool_slots=32),
]


def expected_parity(
    code: str, n: int, pools: list[np.ndarray], layout: gk.KVLayout, slots: np.ndarray
) -> list:
    shards = [np.empty(layout.shard_nbytes(slots.size), np.uint8) for _ in pools]
    for pool, shard in zip(pools, shards, strict=True):
        gk.gather_shard(pool, layout, slots, shard)
    codec = gk.Codec(code, n, backend="numpy")
    parity = [np.empty(shards[0].size, np.uint8) for _ in range(codec.n_parity)]
    codec.encode(shards, parity)
    return parity


@settings(max_examples=20, deadline=None)
@given(
    code=st.sampled_from(["xor", "rdp", "rs"]),
    n=st.integers(1, 6),
    which=st.integers(0, len(LAYOUTS) - 1),
    tokens=st.integers(0, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_gather_matches_gather_then_encode(
    backend: str, code: str, n: int, which: int, tokens: int, seed: int
) -> None:
    layout = LAYOUTS[which]
    rng = np.random.default_rng(seed)
    pools = [rng.integers(0, 256, layout.pool_nbytes, dtype=np.uint8) for _ in range(n)]
    slots = rng.integers(0, layout.pool_slots, tokens)
    codec = gk.Codec(code, n, backend=backend)
    parity = [empty_like_backend(layout.shard_nbytes(tokens), backend) for _ in range(codec.n_parity)]
    codec.encode_gather([to_backend(p, backend) for p in pools], layout, slots, parity)
    for got, want in zip(parity, expected_parity(code, n, pools, layout, slots), strict=True):
        assert np.array_equal(to_host(got), want)


@pytest.mark.parametrize("code", ["xor", "rdp", "rs"])
def test_small_blocks_on_the_cpu(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    # Blocks and RDP row chunks that do not divide rows: every boundary case of the blocked gather.
    monkeypatch.setattr(cpu.CpuBackend, "gather_block_bytes", 1000)
    monkeypatch.setattr(cpu.CpuBackend, "rdp_chunk_bytes", 77)
    layout = LAYOUTS[1]
    rng = np.random.default_rng(4)
    pools = [rng.integers(0, 256, layout.pool_nbytes, dtype=np.uint8) for _ in range(4)]
    slots = rng.permutation(layout.pool_slots)[:41]
    codec = gk.Codec(code, 4)
    parity = [np.zeros(layout.shard_nbytes(41), np.uint8) for _ in range(codec.n_parity)]
    codec.encode_gather(pools, layout, slots, parity)
    for got, want in zip(parity, expected_parity(code, 4, pools, layout, slots), strict=True):
        assert np.array_equal(got, want)
