"""The custodian: every group, the parity store and the encode queue of one sidecar, behind one lock.

Each public method is one RPC's worth of work on plain values (the gRPC servicer only converts
messages). Methods raise `ghostserve.sidecar.errors` subclasses and change nothing when they do, except
where a docstring says otherwise. Recovery (rebuild, stream, plan) lives in `recovery`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import errors as codec_errors
from ghostserve.sidecar import (
    coding,
    config,
    errors,
    group,
    ledger,
    metrics,
    persist,
    pools,
    store,
    workqueue,
)

log = logging.getLogger("ghostserve.sidecar")


@dataclasses.dataclass
class Counters:
    encode_bytes: int = 0
    encode_seconds: float = 0.0
    rebuild_bytes: int = 0
    rebuild_seconds: float = 0.0
    unprotected: int = 0  # chunks that completed without getting parity (cumulative)


@dataclasses.dataclass(frozen=True)
class AttachResult:
    pool: pools.PoolInfo
    created: bool
    needs_rebuild: bool


class Custodian:
    def __init__(self, cfg: config.Config, *, metrics_: metrics.Metrics | None = None) -> None:
        pools.check_prefix(cfg.shm_prefix)
        self.config = cfg
        self.metrics = metrics_ or metrics.Metrics()
        self.lock = threading.RLock()
        self.groups: dict[str, group.Group] = {}
        self.store = store.ParityStore(cfg.budget_bytes)
        self.queue = workqueue.WorkQueue(workers=cfg.encode_workers, depth=cfg.queue_depth)
        self.spill = persist.Spill(cfg.spill_dir) if cfg.spill_dir else None
        self.journal = persist.Journal(cfg.state_dir) if cfg.state_dir else None
        self.counters = Counters()
        self.metrics.parity_budget.set(cfg.budget_bytes)
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop encoding; free pools, state and spill unless keep_pools (then the next start adopts them)."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
        self.queue.close()
        with self.lock:
            for g in list(self.groups.values()):
                for rp in g.ranks:
                    if rp.segment is None:
                        continue
                    if self.config.keep_pools:
                        rp.segment.close()
                    else:
                        rp.segment.unlink()
                if not self.config.keep_pools and self.spill:
                    self.spill.delete_group(g.name)
                if self.journal:
                    if self.config.keep_pools:
                        self.journal.close(g.name)
                    else:
                        self.journal.delete(g.name)
            if not self.config.keep_pools and self.config.state_dir is not None:
                persist.remove_state(self.config.state_dir)
            self.groups.clear()

    def custody(self, kind: str) -> pools.Custody:
        return pools.custody_for(kind, prefix=self.config.shm_prefix)

    def save_state(self) -> None:
        if self.config.state_dir is None:
            return
        persist.save_state(
            self.config.state_dir, {"groups": {name: g.to_state() for name, g in self.groups.items()}}
        )

    # ---- groups and workers ----------------------------------------------------------------------

    def get(self, name: str) -> group.Group:
        g = self.groups.get(name)
        if g is None:
            raise errors.NotFound(f"unknown group {name[:64]!r}")
        return g

    def attach(self, name: str, rank: int, settings: group.Settings, *, worker_id: str) -> AttachResult:
        """Attach `rank` of group `name`, creating the group (first attach) and the rank's pool.

        Raises InvalidArgument (bad id/settings), AlreadyExists (settings differ from the group's),
        ResourceExhausted (no room for the pool)."""
        group.check_group_id(name)
        if len(worker_id) > 256:
            raise errors.InvalidArgument("worker_id longer than 256 characters")
        with self.lock:
            if self._closed:
                raise errors.Unavailable("the sidecar is shutting down")
            g = self.groups.get(name)
            if g is None:
                group.check_settings(settings)
                if not 0 <= rank < settings.world_size:
                    raise errors.InvalidArgument(f"rank {rank} out of range [0, {settings.world_size})")
                try:
                    codec = coding.make_codec(settings.protection, settings.world_size)
                except codec_errors.CodecError as exc:
                    raise errors.InvalidArgument(f"code settings rejected: {exc}") from exc
                g = group.Group(name, settings, codec=codec)
                created_group = True
            else:
                if g.settings != settings:
                    raise errors.AlreadyExists(f"group {name!r} exists with different settings")
                created_group = False
            rp = g.check_rank(rank)
            created = rp.segment is None
            if created:
                self._check_pool_room(g.layout.pool_nbytes)
                rp.segment = self.custody(settings.kind).create(g.layout.pool_nbytes)
            if created_group:
                self.groups[name] = g
            rp.attached, rp.worker_id = True, worker_id
            if created:
                self.save_state()
                self.metrics.pool_bytes.inc(g.layout.pool_nbytes)
            info = g.pool_info(rank)
            assert info is not None
            log.info(
                json.dumps(
                    {"event": "attach", "group": name, "rank": rank, "worker": worker_id, "created": created}
                )
            )
            return AttachResult(info, created, not rp.valid)

    def _check_pool_room(self, nbytes: int) -> None:
        limit = self.config.max_pool_bytes
        if limit is None:
            st = os.statvfs(pools.SHM_DIR)
            limit = st.f_bavail * st.f_frsize
        if nbytes > limit:
            raise errors.ResourceExhausted(f"a pool of {nbytes} B does not fit ({limit} B available)")

    def detach(self, name: str, rank: int) -> None:
        with self.lock:
            rp = self.get(name).check_rank(rank)
            rp.attached = False

    def delete_group(self, name: str) -> None:
        """Free the group's pools, parity, ledger and spill records."""
        with self.lock:
            g = self.get(name)
            for rid in list(g.ledger.requests):
                self.store.release(g.owner(rid))
            for rp in g.ranks:
                if rp.segment is not None:
                    self.metrics.pool_bytes.dec(rp.segment.nbytes)
                    rp.segment.unlink()
                    rp.segment = None
            del self.groups[name]
            if self.spill:
                self.spill.delete_group(name)
            if self.journal:
                self.journal.delete(name)
            self.save_state()
            self._sync_gauges()
            log.info(json.dumps({"event": "group-deleted", "group": name}))

    def mark_lost(self, name: str, ranks: list[int], *, reason: str) -> None:
        """Device fault: each rank gets a fresh zeroed pool (new segment, generation + 1), marked invalid
        until a rebuild; chunks still waiting forget those ranks' commits."""
        with self.lock:
            g = self.get(name)
            if not ranks:
                raise errors.InvalidArgument("no ranks given")
            for r in ranks:
                g.check_rank(r)
            for r in sorted(set(ranks)):
                rp = g.ranks[r]
                new = self.custody(g.settings.kind).create(g.layout.pool_nbytes)
                if rp.segment is not None:
                    rp.segment.unlink()
                else:
                    self.metrics.pool_bytes.inc(new.nbytes)
                rp.segment, rp.generation, rp.valid = new, rp.generation + 1, False
            g.ledger.drop_rank_commits(set(ranks))
            self.save_state()
            log.warning(
                json.dumps(
                    {
                        "event": "ranks-lost",
                        "group": name,
                        "ranks": sorted(set(ranks)),
                        "reason": reason[:200],
                    }
                )
            )

    # ---- ledger ----------------------------------------------------------------------------------

    def commit_chunk(
        self,
        name: str,
        rank: int,
        request_id: str,
        chunk_index: int,
        *,
        slots: npt.NDArray[np.int64],
        token_ids: npt.NDArray[np.int64],
    ) -> ledger.State:
        """Record one rank's commit; the commit that completes a chunk queues its encode (never waits).

        Raises NotFound, InvalidArgument, FailedPrecondition (rank not attached) without changing
        anything; ResourceExhausted when the budget is full and nothing can be evicted — the chunk is
        then recorded as committed and unprotected."""
        with self.lock:
            g = self.get(name)
            rp = g.check_rank(rank)
            if not rp.attached:
                raise errors.FailedPrecondition(f"rank {rank} of {name!r} has no worker attached")
            chunk, done = g.ledger.commit(rank, request_id, chunk_index, slots=slots, token_ids=token_ids)
            if done:
                if self.journal:
                    self.journal.append(name, chunk_record(request_id, chunk))
                self._protect(g, request_id, chunk)
            return chunk.state

    def _unprotect(self, chunk: ledger.Chunk, failure: ledger.Failure, reason: str) -> None:
        chunk.state, chunk.failure = ledger.State.UNPROTECTED, failure
        self.counters.unprotected += 1
        self.metrics.chunks_unprotected.labels(reason).inc()

    def _protect(self, g: group.Group, request_id: str, chunk: ledger.Chunk) -> None:
        if g.protection.code == "none":
            return self._unprotect(chunk, ledger.Failure.NOT_PROTECTED, "code-none")
        if not all(rp.valid and rp.segment is not None for rp in g.ranks):
            return self._unprotect(chunk, ledger.Failure.NOT_PROTECTED, "pool-invalid")
        try:
            item = self.store.reserve(
                g.owner(request_id),
                chunk.index,
                g.parity_nbytes,
                tokens_of=self._tokens_of,
                on_evict=self._on_evict,
            )
        except errors.ResourceExhausted:
            self._unprotect(chunk, ledger.Failure.NOT_PROTECTED, "budget-full")
            raise
        arrays = [rp.segment.array for rp in g.ranks if rp.segment is not None]
        job = _EncodeJob(self, g, request_id, chunk, item, arrays)
        job.generations = [rp.generation for rp in g.ranks]
        if not self.queue.submit(g.name, job.run):
            self.store.release(g.owner(request_id), chunk.index)
            self._unprotect(chunk, ledger.Failure.NOT_PROTECTED, "encoder-behind")
        self._sync_gauges()

    def _tokens_of(self, owner: Any) -> int:
        name, rid = owner
        g = self.groups.get(name)
        req = g.ledger.requests.get(rid) if g else None
        if req is None:
            return 0
        return max(int(req.tokens.size), len(req.chunks) * g.protection.chunk_tokens) if g else 0

    def _on_evict(self, owner: Any, keys: list[Any]) -> None:
        name, rid = owner
        g = self.groups.get(name)
        req = g.ledger.requests.get(rid) if g else None
        for idx in keys:
            chunk = req.chunks.get(idx) if req else None
            if chunk is not None:
                chunk.state, chunk.failure, chunk.parity_bytes = (
                    ledger.State.UNPROTECTED,
                    ledger.Failure.EVICTED,
                    0,
                )
            if self.spill and g:
                self.spill.delete_chunk(g.name, rid, idx)
        self.metrics.evictions.inc(len(keys))
        log.info(json.dumps({"event": "parity-evicted", "group": name, "request": rid, "chunks": len(keys)}))

    def _sync_gauges(self) -> None:
        self.metrics.parity_bytes.set(self.store.held_bytes)

    def record_tokens(
        self,
        name: str,
        request_id: str,
        tokens: npt.NDArray[np.int64],
        *,
        prompt_tokens: int,
        max_new_tokens: int = 0,
    ) -> None:
        with self.lock:
            self.get(name).ledger.record_tokens(
                request_id, tokens, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens
            )

    def describe_request(self, name: str, request_id: str) -> tuple[group.Group, ledger.Request]:
        """The group and ledger entry of one request (caller holds the lock while reading them).

        Raises NotFound (group or request unknown), InvalidArgument (malformed request id)."""
        g = self.get(name)
        ledger.check_request_id(request_id)
        return g, g.ledger.get(request_id)

    def kv_valid(self, g: group.Group, chunk: ledger.Chunk) -> bool:
        """Every rank committed `chunk` and every rank's pool holds its KV now. Caller holds the lock."""
        return (
            chunk.state != ledger.State.WAITING_FOR_RANKS
            and not chunk.kv_lost
            and all(rp.valid and rp.segment is not None for rp in g.ranks)
        )

    def release_request(self, name: str, request_id: str) -> int:
        """Forget a finished request; returns parity bytes freed. Raises NotFound."""
        with self.lock:
            g = self.get(name)
            g.ledger.release(request_id)
            if self.journal:
                self.journal.append(name, {"op": "release", "r": request_id})
            freed = self.store.release(g.owner(request_id))
            if self.spill:
                self.spill.delete_request(name, request_id)
            self._sync_gauges()
            return freed

    def drop_chunk(self, g: group.Group, request_id: str, index: int) -> None:
        """Forget one chunk (the engine will recompute and recommit it). Caller holds the lock."""
        req = g.ledger.requests.get(request_id)
        if req is None or index not in req.chunks:
            return
        del req.chunks[index]
        if self.journal:
            self.journal.append(g.name, {"op": "drop", "r": request_id, "c": index})
        self.store.release(g.owner(request_id), index)
        if self.spill:
            self.spill.delete_chunk(g.name, request_id, index)

    def flush(self, name: str, *, timeout: float) -> tuple[bool, int]:
        """Wait for queued encodes (of `name`, or all when empty). Returns (drained, still pending)."""
        if name:
            with self.lock:
                self.get(name)
        tag = name or None
        drained = self.queue.wait_idle(tag, timeout=timeout)
        return drained, self.queue.pending(tag)


def chunk_record(request_id: str, chunk: ledger.Chunk) -> dict[str, Any]:
    return {
        "op": "chunk",
        "r": request_id,
        "c": chunk.index,
        "s": chunk.slots.tolist(),
        "t": chunk.token_ids.tolist(),
    }


class _EncodeJob:
    """One chunk's encode, run on a worker thread; only the bookkeeping at the end takes the lock."""

    def __init__(
        self,
        owner: Custodian,
        g: group.Group,
        request_id: str,
        chunk: ledger.Chunk,
        item: store.Item,
        arrays: list[npt.NDArray[np.uint8]],
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
        self.generations: list[int] = []

    def run(self) -> None:
        c, g, chunk = self.c, self.g, self.chunk
        start = time.perf_counter()
        try:
            sums = coding.encode_chunk(
                g.codec, g.protection, g.layout, self.arrays, chunk.slots, self.item.buf
            )
        except Exception:
            with c.lock:
                if c.store.get(g.owner(self.rid), chunk.index) is self.item:
                    c.store.release(g.owner(self.rid), chunk.index)
                    c._unprotect(chunk, ledger.Failure.NOT_PROTECTED, "encode-failed")
            raise
        seconds = time.perf_counter() - start
        self.arrays = []
        spilled = False
        if c.spill:
            meta = {
                "slots": chunk.slots.tolist(),
                "token_ids": chunk.token_ids.tolist(),
                "checksums": [str(s) for s in sums],
                "parity_nbytes": int(self.item.buf.size),
            }
            c.spill.write_chunk(g.name, self.rid, chunk.index, parity=self.item.buf, meta=meta)
            spilled = True
        with c.lock:
            current = c.groups.get(g.name) is g and c.store.get(g.owner(self.rid), chunk.index) is self.item
            if not current:
                if spilled and c.spill:
                    c.spill.delete_chunk(g.name, self.rid, chunk.index)
                return
            if [rp.generation for rp in g.ranks] != self.generations:
                if spilled and c.spill:
                    c.spill.delete_chunk(g.name, self.rid, chunk.index)
                c.store.release(g.owner(self.rid), chunk.index)
                c._unprotect(chunk, ledger.Failure.NOT_PROTECTED, "rank-lost-during-encode")
                return
            c.store.commit(self.item)
            chunk.state, chunk.checksums, chunk.parity_bytes = (
                ledger.State.PROTECTED,
                sums,
                self.item.buf.size,
            )
            kv = g.shard_nbytes * g.settings.world_size
            c.counters.encode_bytes += kv
            c.counters.encode_seconds += seconds
            c.metrics.encode_bytes.inc(kv)
            c.metrics.encode_seconds.observe(seconds)
            c.metrics.chunks_protected.inc()
            c._sync_gauges()
