"""The sidecar's chunk encode (blocked gather -> hash -> encode) equals the codec on gathered shards, and
its checksums equal the kernels' checksum of each shard, for every code and awkward sizes."""

from __future__ import annotations

import ghostserve.kernels
import numpy as np
import pytest
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import coding

N = 4
CASES = [
    ((3, 2, 4, "float16", 1, 40), 7),
    ((8, 8, 128, "float16", 16, 256), 32),  # 1 MiB shards: several blocks
    ((2, 3, 5, "float8", 1, 4000), 3000),  # 15-byte rows, blocks not a power of two, a partial last block
]


@pytest.mark.parametrize(("dims", "tokens"), CASES)
@pytest.mark.parametrize(("code", "m"), [("xor", 1), ("rdp", 2), ("rs", 3), ("replicate", 0)])
def test_encode_chunk_matches_the_codec_on_gathered_shards(
    dims: tuple[int, int, int, str, int, int], tokens: int, code: str, m: int
) -> None:
    rng = np.random.default_rng(tokens)
    lay = kvlayout.KVLayout(*dims)
    pools = [rng.integers(0, 256, lay.pool_nbytes, dtype=np.uint8) for _ in range(N)]
    slots = rng.choice(lay.pool_slots, tokens, replace=False)
    size = lay.shard_nbytes(tokens)
    prot = coding.Protection(code, m, tokens)
    codec = coding.make_codec(prot, N)
    out = np.zeros(prot.stored_shards(N) * size, dtype=np.uint8)
    sums = coding.encode_chunk(codec, prot, lay, pools, slots, out)
    shards = [np.empty(size, dtype=np.uint8) for _ in range(N)]
    for pool, shard in zip(pools, shards, strict=True):
        kvlayout.gather_shard(pool, lay, slots, shard)
    assert sums == tuple(ghostserve.kernels.checksum(s) for s in shards)
    if code == "replicate":
        assert np.array_equal(out, np.concatenate(shards))
    else:
        ref = [np.empty(size, dtype=np.uint8) for _ in range(m)]
        codec.encode(shards, ref)
        assert np.array_equal(out, np.concatenate(ref))
        # and the rebuild path inverts it, checksums included
        lost = list(range(min(m, 2)))
        arrays = [None if r in lost else p for r, p in enumerate(pools)]
        got = coding.rebuild_chunk(codec, prot, lay, arrays, slots, out, sums, scratch=coding.Scratch())
        assert got is not None and all(np.array_equal(got[r], shards[r]) for r in lost)
        out[0] ^= 1
        bad = coding.rebuild_chunk(codec, prot, lay, arrays, slots, out, sums, scratch=coding.Scratch())
        assert bad is None  # a damaged parity byte is caught by the checksum, never returned


def test_encode_chunk_rejects_pools_of_the_wrong_size() -> None:
    lay = kvlayout.KVLayout(1, 1, 4, "float32", 1, 8)
    prot = coding.Protection("xor", 1, 2)
    pools = [np.zeros(lay.pool_nbytes, np.uint8), np.zeros(lay.pool_nbytes - 1, np.uint8)]
    from ghostserve.kernels import errors as codec_errors

    with pytest.raises(codec_errors.ShardSizeError, match="pool 1"):
        coding.encode_chunk(
            coding.make_codec(prot, 2), prot, lay, pools, np.arange(2), np.zeros(32, np.uint8)
        )
    rep = coding.Protection("replicate", 0, 2)
    with pytest.raises(ValueError, match="flat uint8"):
        coding.encode_chunk(None, rep, lay, pools, np.arange(2), np.zeros(32, np.uint8))
