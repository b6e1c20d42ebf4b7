"""Moving bytes between pools and parity buffers: encode one chunk, rebuild lost shards of one chunk.

Pure functions over NumPy buffers and a codec (no locks, no gRPC); callers own every buffer passed in.
REPLICATE keeps full copies of all N shards instead of parity; NONE never gets here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash
from ghostserve.kernels import checksums
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


BYTEWISE = ("xor", "rs", "replicate")  # byte i of the parity depends only on byte i of each shard
BLOCK_BYTES = 512 * 1024  # per shard and step: N + M blocks stay in L2/L3 between gather, hash and encode
_local = threading.local()


def _blocks(count: int, nbytes: int) -> list[npt.NDArray[np.uint8]]:
    """Per-thread reusable block buffers (no allocation, no page faults per chunk)."""
    bufs: list[npt.NDArray[np.uint8]] = getattr(_local, "blocks", [])
    if len(bufs) < count or (bufs and bufs[0].size < nbytes):
        bufs = _local.blocks = [np.empty(nbytes, dtype=np.uint8) for _ in range(count)]
    return [b[:nbytes] for b in bufs[:count]]


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

    For byte-wise codes the shards are walked a block at a time: gather the block of every rank, hash
    it while it is in cache, encode it. (Codec.encode_gather followed by a separate hashing pass reads
    every byte from memory twice; this reads it once.)
    """
    if protection.code not in BYTEWISE:
        # RDP's diagonals span the whole shard: encode it in one go, then hash in a second pass.
        codec.encode_gather(list(pools), layout, slots, split(out, protection.parity_shards))
        return tuple(checksums.shard_checksum(pool, layout, np.asarray(slots, np.int64)) for pool in pools)
    slot_arr = kvlayout.check_slots(layout, slots)
    if any(p.dtype != np.uint8 or p.ndim != 1 or p.size != layout.pool_nbytes for p in pools):
        raise ValueError(f"pools must be flat uint8 arrays of {layout.pool_nbytes} bytes")
    size = layout.shard_nbytes(slot_arr.size)
    rows = kvlayout.pool_rows(layout, slot_arr)
    digests = [xxhash.xxh3_64() for _ in pools]
    replicate = protection.code == "replicate"
    targets = split(out, len(pools) if replicate else protection.parity_shards)
    block = max(layout.row_bytes, BLOCK_BYTES // layout.row_bytes * layout.row_bytes)
    scratch = [] if replicate else _blocks(len(pools), min(block, size))
    for off in range(0, size, block):
        step = min(block, size - off)
        views = [t[off : off + step] for t in targets] if replicate else [b[:step] for b in scratch]
        for pool, digest, view in zip(pools, digests, views, strict=True):
            kvlayout.gather_range(pool, layout, rows, off, view)
            digest.update(view.data)
        if not replicate:
            codec.encode(views, [t[off : off + step] for t in targets])
    return tuple(int(d.intdigest()) for d in digests)


class Scratch:
    """Reusable shard-sized buffers for rebuilds (allocated on first use, then reused)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, int], npt.NDArray[np.uint8]] = {}

    def get(self, index: int, nbytes: int) -> npt.NDArray[np.uint8]:
        buf = self._bufs.get((index, nbytes))
        if buf is None:
            buf = self._bufs[(index, nbytes)] = np.empty(nbytes, dtype=np.uint8)
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
