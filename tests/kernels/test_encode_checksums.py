"""Codec.encode_gather(checksums_out=...) hashes every data shard while encoding: the sums equal the
checksum of the gathered shard and the parity is unchanged by asking for them."""

from __future__ import annotations

import numpy as np
import pytest
from ghostserve.kernels import Codec, checksums
from ghostserve.kernels import layout as kvlayout

LAYOUT = kvlayout.KVLayout(2, 4, 64, "float16", 16, 512)  # 512-byte rows, big enough for several blocks


@pytest.mark.parametrize(("code", "n", "m"), [("xor", 4, 1), ("rs", 5, 3), ("rdp", 4, 2)])
def test_checksums_out_match_the_gathered_shards(code: str, n: int, m: int) -> None:
    rng = np.random.default_rng(7)
    pools = [rng.integers(0, 256, LAYOUT.pool_nbytes, dtype=np.uint8) for _ in range(n)]
    slots = rng.permutation(LAYOUT.pool_slots)[:96]
    size = LAYOUT.shard_nbytes(slots.size)
    codec = Codec(code, n, m, backend="cpu")
    plain = [np.zeros(size, np.uint8) for _ in range(m)]
    codec.encode_gather(pools, LAYOUT, slots, plain)
    hashed = [np.zeros(size, np.uint8) for _ in range(m)]
    sums: list[int] = []
    codec.encode_gather(pools, LAYOUT, slots, hashed, checksums_out=sums)
    assert all(np.array_equal(a, b) for a, b in zip(plain, hashed, strict=True))
    want = []
    for pool in pools:
        shard = np.empty(size, np.uint8)
        kvlayout.gather_shard(pool, LAYOUT, slots, shard)
        want.append(checksums.checksum(shard))
    assert sums == want
