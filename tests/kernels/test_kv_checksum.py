"""checksum() is xxh3-64 of the raw bytes, whatever holds them; shard_checksum() gives the same value
straight from a pool, without gathering the shard."""

from __future__ import annotations

import ghostserve.kernels as gk
import numpy as np
import pytest
import xxhash
from ghostserve.kernels import checksums
from ghostserve.kernels import layout as kvlayout
from hypothesis import given, settings
from hypothesis import strategies as st

LAYOUT = kvlayout.KVLayout(3, 2, 4, "float16", 1, 40)


def test_checksum_is_xxh3_of_the_bytes() -> None:
    raw = np.random.default_rng(0).integers(0, 256, 1001, dtype=np.uint8)
    want = xxhash.xxh3_64_intdigest(raw.tobytes())
    assert gk.checksum(raw) == want
    assert gk.checksum(raw.tobytes()) == want
    assert gk.checksum(bytearray(raw.tobytes())) == want
    assert gk.checksum(raw[:1000].view(np.float16)) == xxhash.xxh3_64_intdigest(raw[:1000].tobytes())
    flipped = raw.copy()
    flipped[500] ^= 1
    assert gk.checksum(flipped) != want


def test_checksum_of_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(33, dtype=torch.bfloat16)
    assert gk.checksum(t) == xxhash.xxh3_64_intdigest(t.view(torch.uint8).numpy().tobytes())


def test_checksum_rejects_non_contiguous() -> None:
    with pytest.raises(gk.ShardTypeError, match="C-contiguous"):
        gk.checksum(np.zeros(10, np.uint8)[::2])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 39), min_size=0, max_size=40, unique=True), st.integers(0, 2**32 - 1))
def test_in_place_checksum_matches_gathered_shard(slots: list[int], seed: int) -> None:
    pool = np.random.default_rng(seed).integers(0, 256, LAYOUT.pool_nbytes, dtype=np.uint8)
    arr = np.asarray(slots, dtype=np.int64)
    shard = np.empty(LAYOUT.shard_nbytes(arr.size), dtype=np.uint8)
    kvlayout.gather_shard(pool, LAYOUT, arr, shard)
    assert checksums.shard_checksum(pool, LAYOUT, arr) == gk.checksum(shard)


def test_runs_split_at_gaps_and_descents() -> None:
    assert checksums.runs(np.asarray([3, 4, 5, 9, 8, 10, 11], dtype=np.int64)) == [
        (3, 6),
        (9, 10),
        (8, 9),
        (10, 12),
    ]
