"""Moving bytes between pools and parity buffers: encode one chunk, rebuild lost shards of one chunk.

Pure functions over NumPy buffers and a codec (no locks, no gRPC); callers own every buffer passed in.
REPLICATE keeps full copies of all N shards instead of parity; NONE never gets here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash
from ghostserve.kernels import checksums, cpu
from ghostserve.kernels import layout as kvlayout
from ghostserve.kernels import protection as protection_mod

# Defined once in kernels (docs/design.md, "One definition"); re-exported for the sidecar's modules.
CODES = protection_mod.CODES
Protection = protection_mod.Protection


def make_codec(protection: Protection, world_size: int) -> Any:
    """The codec for an erasure code, or None for NONE/REPLICATE. Raises kernels.CodecError."""
    if protection.code in ("none", "replicate"):
        return None
    import ghostserve.kernels  # heavy only for groups that encode

    return ghostserve.kernels.Codec(protection.code, world_size, protection.parity_shards, backend="cpu")


def split(buf: npt.NDArray[np.uint8], count: int) -> list[npt.NDArray[np.uint8]]:
    size = buf.size // count if count else 0
    return [buf[i * size : (i + 1) * size] for i in range(count)]


BLOCK_BYTES = 512 * 1024  # replicate copies a block of every shard at a time: it stays in cache for the hash


def encode_chunk(
    codec: Any,
    protection: Protection,
    layout: kvlayout.KVLayout,
    pools: Sequence[npt.NDArray[np.uint8]],
    slots: npt.NDArray[np.int64],
    out: npt.NDArray[np.uint8],
) -> tuple[int, ...]:
    """Fill `out` (stored_shards * S bytes) with the chunk's parity (or copies); return the checksums of
    the N data shards. Reads the pools, mutates `out` only. Raises kernels.CodecError on bad buffers.

    Codes go through `Codec.encode_gather(checksums_out=...)`, which hashes each gathered block while it
    is in cache (RDP, whose diagonals span the whole shard, hashes in a second pass). Replicate copies
    block by block into the parity buffer and hashes each block as it lands.
    """
    if protection.code != "replicate":
        sums: list[int] = []
        parity = split(out, protection.parity_shards)
        codec.encode_gather(list(pools), layout, slots, parity, checksums_out=sums)
        return tuple(sums)
    slot_arr = kvlayout.check_slots(layout, slots)
    if any(p.dtype != np.uint8 or p.ndim != 1 or p.size != layout.pool_nbytes for p in pools):
        raise ValueError(f"pools must be flat uint8 arrays of {layout.pool_nbytes} bytes")
    size = layout.shard_nbytes(slot_arr.size)
    rows = kvlayout.pool_rows(layout, slot_arr)
    digests = [xxhash.xxh3_64() for _ in pools]
    targets = split(out, len(pools))
    block = max(layout.row_bytes, BLOCK_BYTES // layout.row_bytes * layout.row_bytes)
    for off in range(0, size, block):
        step = min(block, size - off)
        for pool, digest, target in zip(pools, digests, targets, strict=True):
            view = target[off : off + step]
            kvlayout.gather_range(pool, layout, rows, off, view)
            digest.update(view.data)
    return tuple(int(d.intdigest()) for d in digests)


class Scratch:
    """Reusable shard-sized buffers for rebuilds (allocated on first use, then reused)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, int], npt.NDArray[np.uint8]] = {}

    def get(self, index: int, nbytes: int) -> npt.NDArray[np.uint8]:
        buf = self._bufs.get((index, nbytes))
        if buf is None:
            buf = self._bufs[(index, nbytes)] = cpu.aligned_empty(nbytes)
        return buf


def rebuild_chunk(
    codec: Any,
    protection: Protection,
    layout: kvlayout.KVLayout,
    pools: Sequence[npt.NDArray[np.uint8] | None],
    slots: npt.NDArray[np.int64],
    parity: npt.NDArray[np.uint8],
    sums: Sequence[int],
    *,
    scratch: Scratch,
) -> dict[int, npt.NDArray[np.uint8]] | None:
    """Reconstruct the shards of the ranks whose pool is None from the others + `parity`.

    Returns {rank: rebuilt shard} (buffers from `scratch`, valid until its next use) when every
    surviving shard still matches the checksum recorded at encode time (checked before it is used, for
    every code: a survivor whose KV changed since means the chunk is no longer what was encoded) and
    every rebuilt shard matches its own; None on any mismatch (the caller must not use the bytes).
    Reads pools and parity; mutates scratch only.
    """
    if len(sums) != len(pools):
        return None
    n = len(pools)
    lost = [r for r, p in enumerate(pools) if p is None]
    s = layout.shard_nbytes(slots.size)
    out: dict[int, npt.NDArray[np.uint8]] = {}
    if protection.code == "replicate":
        slot_arr = np.asarray(slots, np.int64)
        for r, pool in enumerate(pools):
            if pool is not None and checksums.shard_checksum(pool, layout, slot_arr) != sums[r]:
                return None
        copies = split(parity, n)
        for r in lost:
            dst = scratch.get(r, s)
            dst[:] = copies[r]
            out[r] = dst
    else:
        shards: list[Any] = [None] * (n + protection.parity_shards)
        for r, pool in enumerate(pools):
            if pool is not None:
                shards[r] = scratch.get(r, s)
                kvlayout.gather_shard(pool, layout, slots, shards[r])
                if checksums.checksum(shards[r]) != sums[r]:
                    return None
        for j, p in enumerate(split(parity, protection.parity_shards)):
            shards[n + j] = p
        out = {r: scratch.get(r, s) for r in lost}
        codec.reconstruct(shards, out=out)
    if any(checksums.checksum(out[r]) != sums[r] for r in lost):
        return None
    return out
