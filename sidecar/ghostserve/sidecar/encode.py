"""One chunk's encode, run on a worker thread of the encode queue: read the pools, write parity and
checksums into the reserved buffer, spill it, then (under the locks) publish it as PROTECTED.

Whatever goes wrong after the reservation (the codec, a spill write on a full disk, a rank lost while
encoding) releases the reservation and leaves the chunk UNPROTECTED: a chunk never stays QUEUED after
its job ended, so Flush never reports drained while a chunk is stuck.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import numpy.typing as npt
from ghostserve.sidecar import coding, group, ledger, store
from ghostserve.sidecar.host import Host

log = logging.getLogger("ghostserve.sidecar")


class EncodeJob:
    def __init__(
        self,
        owner: Host,
        g: group.Group,
        request_id: str,
        chunk: ledger.Chunk,
        item: store.Item,
        arrays: list[npt.NDArray[np.uint8]],
        *,
        generations: tuple[int, ...],
    ) -> None:
        self.c, self.g, self.rid, self.chunk, self.item, self.arrays = (
            owner,
            g,
            request_id,
            chunk,
            item,
            arrays,
        )
        # Pool generations when the chunk was queued. A rank lost before the encode finished (MarkLost)
        # means the encode read memory that, on a real device fault, no longer holds the KV: its parity
        # and checksums would describe garbage and a later rebuild would "verify" it. Such a chunk is
        # left unprotected instead.
        self.generations = generations

    def _current(self) -> bool:
        """The chunk still wants this parity (not released, dropped, evicted or its group deleted).
        Caller holds the custodian's lock."""
        c, g = self.c, self.g
        return c.groups.get(g.name) is g and c.store.get(g.owner(self.rid), self.chunk.index) is self.item

    def _give_up(self, reason: str) -> None:
        c, g, chunk = self.c, self.g, self.chunk
        with g.lock:
            with c.lock:
                current = self._current()
                if current:
                    c.store.release(g.owner(self.rid), chunk.index)
            if current:
                c.unprotect(chunk, ledger.Failure.NOT_PROTECTED, reason)
            c.sync_gauges()

    def run(self) -> None:
        c, g, chunk = self.c, self.g, self.chunk
        start = time.perf_counter()
        try:
            sums = coding.encode_chunk(
                g.codec, g.protection, g.layout, self.arrays, chunk.slots, self.item.buf
            )
        except Exception:
            self._give_up("encode-failed")
            raise
        finally:
            self.arrays = []
        seconds = time.perf_counter() - start
        spilled = False
        if c.spill:
            meta = {
                "slots": chunk.slots.tolist(),
                "token_ids": chunk.token_ids.tolist(),
                "checksums": [str(s) for s in sums],
                "parity_nbytes": int(self.item.buf.size),
            }
            try:
                c.spill.write_chunk(g.name, self.rid, chunk.index, parity=self.item.buf, meta=meta)
            except OSError as exc:
                # Disk full or gone: parity that does not survive a restart is what the operator asked
                # us not to promise, so the chunk is unprotected (and its memory given back).
                with contextlib.suppress(OSError):
                    c.spill.delete_chunk(g.name, self.rid, chunk.index)
                log.warning("spill-failed", extra={"group": g.name, "request": self.rid, "error": str(exc)})
                self._give_up("spill-failed")
                return
            spilled = True
        with g.lock:
            with c.lock:
                current = self._current()
                lost = current and g.generations() != self.generations
                if lost:
                    c.store.release(g.owner(self.rid), chunk.index)
                elif current:
                    c.store.commit(self.item)
                    kv = g.shard_nbytes * g.settings.world_size
                    c.counters.encode_bytes += kv
                    c.counters.encode_seconds += seconds
            if not current or lost:
                if spilled and c.spill:
                    c.spill.delete_chunk(g.name, self.rid, chunk.index)
                if lost:
                    c.unprotect(chunk, ledger.Failure.NOT_PROTECTED, "rank-lost-during-encode")
                return
            chunk.state, chunk.checksums, chunk.parity_bytes = (
                ledger.State.PROTECTED,
                sums,
                self.item.buf.size,
            )
            c.metrics.encode_bytes.inc(kv)
            c.metrics.encode_seconds.observe(seconds)
            c.metrics.chunks_protected.inc()
            c.sync_gauges()
