"""Shard checksums computed in place from the pool equal the kernels' checksum of the gathered shard."""

from __future__ import annotations

import ghostserve.kernels
import numpy as np
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import checksums
from hypothesis import given, settings
from hypothesis import strategies as st

LAYOUT = kvlayout.KVLayout(3, 2, 4, "float16", 1, 40)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 39), min_size=0, max_size=40, unique=True), st.integers(0, 2**32 - 1))
def test_in_place_checksum_matches_gathered_shard(slots: list[int], seed: int) -> None:
    pool = np.random.default_rng(seed).integers(0, 256, LAYOUT.pool_nbytes, dtype=np.uint8)
    arr = np.asarray(slots, dtype=np.int64)
    shard = np.empty(LAYOUT.shard_nbytes(arr.size), dtype=np.uint8)
    kvlayout.gather_shard(pool, LAYOUT, arr, shard)
    assert checksums.shard_checksum(pool, LAYOUT, arr) == ghostserve.kernels.checksum(shard)
    assert checksums.checksum(shard) == ghostserve.kernels.checksum(shard)


def test_runs_split_at_gaps_and_descents() -> None:
    assert checksums.runs(np.asarray([3, 4, 5, 9, 8, 10, 11], dtype=np.int64)) == [
        (3, 6),
        (9, 10),
        (8, 9),
        (10, 12),
    ]
