"""Shard checksums (xxh3-64 of the raw bytes), recorded at encode time and checked after every rebuild.

`checksum` hashes a buffer; `shard_checksum` gives the same value for the shard of a slot list straight
from a pool, without gathering it: the shard is hashed as a stream of contiguous pool pieces, one per
(plane, run of consecutive slots). The sidecar uses both (docs/design.md, "Data model").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash
from ghostserve.kernels import cpu
from ghostserve.kernels import layout as kvlayout


def checksum(buf: Any) -> int:
    """xxh3-64 of `buf`'s bytes. Host buffers are hashed in place; CUDA tensors / cupy arrays are copied
    to the host first. Raises `ShardTypeError` for unsupported or non-contiguous buffers."""
    module = type(buf).__module__.split(".")[0]
    if module == "cupy":
        host = buf.reshape(-1).view("uint8").get()
    elif module == "torch" and buf.device.type != "cpu":
        host = cpu.host_bytes(buf.detach().cpu(), what="buffer", writable=False)
    else:
        host = cpu.host_bytes(buf, what="buffer", writable=False)
    return int(xxhash.xxh3_64_intdigest(np.ascontiguousarray(host).data))


def runs(slots: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive increasing slot ids, in slot-list order."""
    if slots.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [slots.size]))
    return [(int(slots[a]), int(slots[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def shard_checksum(
    pool: npt.NDArray[np.uint8], layout: kvlayout.KVLayout, slots: npt.NDArray[np.int64]
) -> int:
    """`checksum` of the shard of `slots` in `pool` (flat uint8 of layout.pool_nbytes). Reads only."""
    planes = pool.reshape(layout.planes, layout.pool_slots, layout.row_bytes)
    digest = xxhash.xxh3_64()
    slot_runs = runs(slots)
    for p in range(layout.planes):
        plane = planes[p]
        for start, stop in slot_runs:
            digest.update(plane[start:stop])
    return int(digest.intdigest())
