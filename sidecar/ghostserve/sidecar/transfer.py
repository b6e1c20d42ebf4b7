"""Receiving side of StreamRebuild: write a stream of rebuilt shard pieces into a local pool (e.g. the
replacement rank's pool on another node). Imports numpy and the layout helpers, not gRPC."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import errors


@dataclasses.dataclass
class Received:
    """What a stream delivered: chunks written per request, and chunks to recompute with the reason
    (ghostserve.v1.ChunkFailure values)."""

    written: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    failed: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)
    bytes_written: int = 0


def receive_into_pool(
    pieces: Iterable[Any], pool: npt.NDArray[np.uint8], layout: kvlayout.KVLayout
) -> Received:
    """Consume `pieces` (RebuiltShardPiece messages, in stream order) and scatter each complete shard into
    `pool` (flat uint8, layout.pool_nbytes) at the chunk's slots. Mutates `pool` only for complete
    shards. Raises InvalidArgument for pieces that do not fit the layout or arrive out of order."""
    out = Received()
    buf: npt.NDArray[np.uint8] | None = None
    slots: npt.NDArray[np.int64] | None = None
    key: tuple[str, int] | None = None
    for p in pieces:
        rid, idx = str(p.request_id), int(p.chunk_index)
        if p.failure:
            out.failed.setdefault(rid, []).append((idx, int(p.failure)))
            continue
        offset, data, total = int(p.offset), p.data, int(p.shard_nbytes)
        if offset == 0:
            slots = np.asarray(p.slots, dtype=np.int64)
            if layout.shard_nbytes(slots.size) != total:
                raise errors.InvalidArgument(
                    f"chunk {idx} of {rid!r}: {total} bytes do not fit {slots.size} slots"
                )
            buf, key = np.empty(total, dtype=np.uint8), (rid, idx)
        if buf is None or slots is None or key != (rid, idx) or offset + len(data) > buf.size:
            raise errors.InvalidArgument(
                f"piece of chunk {idx} of {rid!r} at offset {offset} is out of order"
            )
        buf[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        if offset + len(data) == buf.size:
            kvlayout.scatter_shard(buf, layout, slots, pool)
            out.written.setdefault(rid, []).append(idx)
            out.bytes_written += buf.size
            buf, slots, key = None, None, None
    return out
