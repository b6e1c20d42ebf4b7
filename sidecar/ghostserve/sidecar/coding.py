"""Moving bytes between pools and parity buffers: encode one chunk, rebuild lost shards of one chunk.

Pure functions over NumPy buffers and a codec (no locks, no gRPC); callers own every buffer passed in.
REPLICATE keeps full copies of all N shards instead of parity; NONE never gets here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import checksums

CODES = ("none", "replicate", "xor", "rdp", "rs")


@dataclasses.dataclass(frozen=True)
class Protection:
    """code: one of CODES; parity_shards: M (XOR 1, RDP 2, RS 1..8, REPLICATE N copies, NONE 0)."""

    code: str
    parity_shards: int
    chunk_tokens: int

    def stored_shards(self, world_size: int) -> int:
        """Shards of S bytes held per chunk."""
        if self.code == "none":
            return 0
        return world_size if self.code == "replicate" else self.parity_shards

    def tolerates(self, lost: int, world_size: int) -> bool:
        if self.code == "none":
            return False
        return lost <= (world_size if self.code == "replicate" else self.parity_shards)


def make_codec(protection: Protection, world_size: int) -> Any:
    """The codec for an erasure code, or None for NONE/REPLICATE. Raises kernels.CodecError."""
    if protection.code in ("none", "replicate"):
        return None
    import ghostserve.kernels  # heavy only for groups that encode

    return ghostserve.kernels.Codec(protection.code, world_size, protection.parity_shards, backend="cpu")


def split(buf: npt.NDArray[np.uint8], count: int) -> list[npt.NDArray[np.uint8]]:
    size = buf.size // count if count else 0
    return [buf[i * size : (i + 1) * size] for i in range(count)]


def encode_chunk(
    codec: Any,
    protection: Protection,
    layout: kvlayout.KVLayout,
    pools: Sequence[npt.NDArray[np.uint8]],
    slots: npt.NDArray[np.int64],
    out: npt.NDArray[np.uint8],
) -> tuple[int, ...]:
    """Fill `out` (stored_shards * S bytes) with the chunk's parity (or copies); return the checksums of
    the N data shards. Reads the pools, mutates `out` only. Raises kernels.CodecError on bad buffers."""
    sums = tuple(checksums.shard_checksum(pool, layout, slots) for pool in pools)
    if protection.code == "replicate":
        for pool, dst in zip(pools, split(out, len(pools)), strict=True):
            kvlayout.gather_shard(pool, layout, slots, dst)
    else:
        codec.encode_gather(list(pools), layout, slots, split(out, protection.parity_shards))
    return sums


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

    Returns {rank: rebuilt shard} (buffers from `scratch`, valid until its next use) when every rebuilt
    shard matches its recorded checksum, None on a mismatch (the caller must not use the bytes).
    Reads pools and parity; mutates scratch only.
    """
    n = len(pools)
    lost = [r for r, p in enumerate(pools) if p is None]
    s = layout.shard_nbytes(slots.size)
    out: dict[int, npt.NDArray[np.uint8]] = {}
    if protection.code == "replicate":
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
        for j, p in enumerate(split(parity, protection.parity_shards)):
            shards[n + j] = p
        out = {r: scratch.get(r, s) for r in lost}
        codec.reconstruct(shards, out=out)
    if any(checksums.checksum(out[r]) != sums[r] for r in lost):
        return None
    return out
