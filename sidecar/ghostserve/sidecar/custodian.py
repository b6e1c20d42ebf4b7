"""The custodian: every group of one sidecar, the parity store and the encode queue.

Each public method is one RPC's worth of work on plain values (the gRPC servicer only converts
messages). Methods raise `ghostserve.sidecar.errors` subclasses and change nothing when they do, except
where a docstring says otherwise. Commits and the ledger live in `commits`, encodes in `encode`,
recovery (rebuild, stream, plan) in `recovery`.

Locks: `Custodian.lock` guards the group table, the parity store and the counters; each group's
`g.lock` guards its ranks and ledger. A thread takes a group's lock first and the custodian's lock
inside it, never the other way round, and holds neither while it moves bulk bytes (encode, rebuild).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ghostserve.kernels import errors as codec_errors
from ghostserve.sidecar import (
    budget,
    coding,
    commits,
    config,
    devices,
    errors,
    group,
    ledger,
    metrics,
    persist,
    pools,
    store,
    workqueue,
)
from ghostserve.sidecar.host import Counters

log = logging.getLogger("ghostserve.sidecar")


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
        if cfg.state_dir is not None:
            persist.private_dir(cfg.state_dir)
        self.counters = Counters()
        self.attaches = 0  # orders attaches for device attribution (`devices.rank_of`)
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
            groups = list(self.groups.values())
        for g in groups:
            with g.lock:
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
        with self.lock:
            if not self.config.keep_pools and self.config.state_dir is not None:
                persist.remove_state(self.config.state_dir)
            self.groups.clear()

    def custody(self, kind: str) -> pools.Custody:
        return pools.custody_for(kind, prefix=self.config.shm_prefix)

    def save_state(self) -> None:
        if self.config.state_dir is None:
            return
        with self.lock:
            state = {"groups": {name: g.to_state() for name, g in self.groups.items()}}
            persist.save_state(self.config.state_dir, state)

    # ---- groups and workers ----------------------------------------------------------------------

    def get(self, name: str) -> group.Group:
        with self.lock:
            g = self.groups.get(name)
        if g is None:
            raise errors.NotFound(f"unknown group {name[:64]!r}")
        return g

    @contextmanager
    def locked(self, name: str) -> Iterator[group.Group]:
        """The group `name` with its lock held. Raises NotFound (also when it is deleted meanwhile)."""
        g = self.get(name)
        with g.lock:
            with self.lock:
                if self.groups.get(name) is not g:
                    raise errors.NotFound(f"group {name[:64]!r} was deleted")
            yield g

    def attach(
        self,
        name: str,
        rank: int,
        settings: group.Settings,
        *,
        worker_id: str,
        identity: str = "",
        device_uuid: str = "",
        budget_bytes: int = 0,
    ) -> AttachResult:
        """Attach `rank` of group `name`, creating the group (first attach, owned by `identity`) and the
        rank's pool. `device_uuid` names the rank's GPU (health events name the rank), `budget_bytes`
        (non-zero) sets the group's own parity budget.

        Raises InvalidArgument (bad id/settings), AlreadyExists (settings differ from the group's),
        ResourceExhausted (no room for the pool)."""
        group.check_group_id(name)
        devices.check_uuid(device_uuid)
        if len(worker_id) > 256:
            raise errors.InvalidArgument("worker_id longer than 256 characters")
        if budget_bytes < 0:
            raise errors.InvalidArgument(f"parity_budget_bytes must be >= 0, got {budget_bytes}")
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
                g = group.Group(name, settings, codec=codec, creator=identity)
                self.groups[name] = g
                created_group = True
            else:
                if g.settings != settings:
                    raise errors.AlreadyExists(f"group {name!r} exists with different settings")
                created_group = False
                if not g.creator:
                    g.creator = identity  # unclaimed (older state file, or moved here without one)
            self.attaches += 1
            seq = self.attaches
        with g.lock:
            try:
                rp = g.check_rank(rank)
                created = rp.segment is None
                if created:
                    self._check_pool_room(g)
                    rp.segment = self.custody(settings.kind).create(g.layout.pool_nbytes)
            except errors.SidecarError:
                if created_group and all(r.segment is None for r in g.ranks):
                    with self.lock:
                        self.groups.pop(name, None)
                raise
            changed = created or rp.device_uuid != device_uuid
            rp.attached, rp.worker_id = True, worker_id
            rp.device_uuid, rp.attach_seq = device_uuid, seq
            if budget_bytes and budget_bytes != g.budget_bytes:
                g.budget_bytes, changed = budget_bytes, True
            if changed:
                self.save_state()
            if created:
                self.metrics.pool_bytes.inc(g.layout.pool_nbytes)
            info = g.pool_info(rank)
            assert info is not None
            needs_rebuild = not rp.valid
        log.info("attach", extra={"group": name, "rank": rank, "worker": worker_id, "group_created": created})
        return AttachResult(info, created, needs_rebuild)

    def pool_bytes_held(self) -> int:
        with self.lock:
            groups = list(self.groups.values())
        return sum(g.pool_bytes() for g in groups)

    def _check_pool_room(self, g: group.Group) -> None:
        cfg = self.config
        budget.check_pool_room(
            g.layout.pool_nbytes,
            held_total=self.pool_bytes_held(),
            held_group=g.pool_bytes(),
            max_total=cfg.max_pool_bytes,
            max_group=cfg.max_group_pool_bytes,
            headroom=cfg.shm_headroom_bytes,
            shm_dir=pools.SHM_DIR,
        )

    def detach(self, name: str, rank: int) -> None:
        with self.locked(name) as g:
            g.check_rank(rank).attached = False

    def delete_group(self, name: str) -> None:
        """Free the group's pools, parity, ledger and spill records."""
        with self.locked(name) as g:
            with self.lock:
                for rid, req in g.ledger.requests.items():
                    self.store.release(g.owner(rid))
                    self.store.uncharge(commits.request_cost(req))
                del self.groups[name]
            for rp in g.ranks:
                if rp.segment is not None:
                    self.metrics.pool_bytes.dec(rp.segment.nbytes)
                    rp.segment.unlink()
                    rp.segment = None
            g.ledger.requests.clear()
            if self.spill:
                self.spill.delete_group(name)
            if self.journal:
                self.journal.delete(name)
            self.save_state()
            self.sync_gauges()
        log.info("group-deleted", extra={"group": name})

    def mark_lost(self, name: str, ranks: list[int], *, reason: str) -> None:
        """Device fault: each rank gets a fresh zeroed pool (new segment, generation + 1), marked invalid
        until a rebuild; chunks still waiting forget those ranks' commits. A rebuild of the group in
        flight sees the generation change and stops without marking anything valid."""
        if not ranks:
            raise errors.InvalidArgument("no ranks given")
        with self.locked(name) as g:
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
        log.warning("ranks-lost", extra={"group": name, "ranks": sorted(set(ranks)), "reason": reason[:200]})

    # ---- ledger (see `commits`) ------------------------------------------------------------------

    # The ledger's operations are `commits`' functions, bound as methods (their first argument is the
    # custodian, typed as `host.Host`).
    commit_chunk = commits.commit_chunk
    commit_chunks = commits.commit_chunks
    record_tokens = commits.record_tokens
    release_request = commits.release_request
    drop_chunk = commits.drop_chunk

    def describe_request(self, name: str, request_id: str) -> tuple[group.Group, ledger.Request]:
        """The group and ledger entry of one request (caller holds the group's lock while reading them).

        Raises NotFound (group or request unknown), InvalidArgument (malformed request id)."""
        g = self.get(name)
        ledger.check_request_id(request_id)
        return g, g.ledger.get(request_id)

    def kv_valid(self, g: group.Group, chunk: ledger.Chunk) -> bool:
        """Every rank committed `chunk` and every rank's pool holds its KV now. Caller holds g.lock."""
        return chunk.state != ledger.State.WAITING_FOR_RANKS and not chunk.kv_lost and g.healthy()

    def flush(self, name: str, *, timeout: float) -> tuple[bool, int]:
        """Wait for queued encodes (of `name`, or all when empty). Returns (drained, still pending)."""
        if name:
            self.get(name)
        tag = name or None
        drained = self.queue.wait_idle(tag, timeout=timeout)
        return drained, self.queue.pending(tag)

    # ---- parity store callbacks (called with self.lock held) -------------------------------------

    def tokens_of(self, owner: Any) -> int:
        name, rid = owner
        g = self.groups.get(name)
        req = g.ledger.requests.get(rid) if g else None
        if req is None or g is None:
            return 0
        return max(int(req.tokens.size), len(req.chunks) * g.protection.chunk_tokens)

    def on_evict(self, owner: Any, keys: list[Any]) -> None:
        """Parity of `owner`'s chunks `keys` was evicted. Runs under self.lock, possibly while another
        group's lock is held: it only flips attributes of the chunks (atomic under the GIL)."""
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
        log.info("parity-evicted", extra={"group": name, "request": rid, "chunks": len(keys)})

    def sync_gauges(self) -> None:
        self.metrics.parity_bytes.set(self.store.held_bytes)

    def unprotect(self, chunk: ledger.Chunk, failure: ledger.Failure, reason: str) -> None:
        chunk.state, chunk.failure = ledger.State.UNPROTECTED, failure
        with self.lock:
            self.counters.unprotected += 1
        self.metrics.chunks_unprotected.labels(reason).inc()
