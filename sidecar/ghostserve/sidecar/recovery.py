"""Recovery of lost ranks: plan (hybrid recompute/rebuild), rebuild into local pools, or stream the
rebuilt shards to a replacement on another node.

Every rebuilt shard is checked against the xxh3 checksum recorded at encode time before it is used; a
mismatch is reported as CHECKSUM_MISMATCH and the bytes are never written. After a local rebuild, chunks
that were skipped (below first_chunk) or could not be rebuilt are dropped from the ledger: the engine
recomputes them and commits them again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Generator

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import coding, custodian, errors, group, ledger, planner, store

log = logging.getLogger("ghostserve.sidecar")


@dataclasses.dataclass
class RequestResult:
    request_id: str
    rebuilt: list[int] = dataclasses.field(default_factory=list)
    failed: list[tuple[int, ledger.Failure]] = dataclasses.field(default_factory=list)
    bytes_rebuilt: int = 0


@dataclasses.dataclass
class Report:
    requests: list[RequestResult]
    bytes_rebuilt: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Piece:
    """One chunk's rebuilt shard of one rank (data None: could not be rebuilt, see failure)."""

    request_id: str
    chunk_index: int
    slots: npt.NDArray[np.int64]
    data: bytes | None
    failure: ledger.Failure


def _check_lost(g: group.Group, lost_ranks: list[int]) -> list[int]:
    if not lost_ranks:
        raise errors.InvalidArgument("no lost ranks given")
    for r in lost_ranks:
        g.check_rank(r)
    lost = sorted(set(lost_ranks))
    bad = [r for r, rp in enumerate(g.ranks) if r not in lost and (not rp.valid or rp.segment is None)]
    if bad:
        raise errors.FailedPrecondition(f"ranks {bad} hold no valid pool but are not listed as lost")
    return lost


def _selection(
    g: group.Group, request_ids: list[str], first_chunk: dict[str, int]
) -> list[tuple[str, int, int]]:
    """(request id, chunk index, first chunk) of every complete chunk to consider, in order."""
    for rid in request_ids:
        ledger.check_request_id(rid)
    ids = request_ids or sorted(g.ledger.requests)
    out = []
    for rid in ids:
        req = g.ledger.requests.get(rid)
        if req is None:
            continue
        first = int(first_chunk.get(rid, 0))
        out += [(rid, c.index, first) for c in sorted(req.complete_chunks(), key=lambda c: c.index)]
    return out


@dataclasses.dataclass
class _Work:
    """What rebuilding one chunk needs, captured under the group's lock and used outside it."""

    chunk: ledger.Chunk
    item: store.Item
    survivors: list[npt.NDArray[np.uint8] | None]


def _prepare(
    c: custodian.Custodian, g: group.Group, lost: list[int], rid: str, idx: int
) -> tuple[ledger.Chunk | None, _Work | None, ledger.Failure]:
    """Find chunk `idx` of `rid` and pin its parity (a concurrent eviction must not recycle the buffer
    while it is read). Caller holds g.lock; the caller unpins with `_unpin`."""
    req = g.ledger.requests.get(rid)
    chunk = req.chunks.get(idx) if req else None
    if chunk is None:
        return None, None, ledger.Failure.NOT_PROTECTED
    if not g.protection.tolerates(len(lost), g.settings.world_size):
        return chunk, None, ledger.Failure.TOO_MANY_LOSSES
    with c.lock:
        item = c.store.get(g.owner(rid), idx)
        if chunk.state != ledger.State.PROTECTED or item is None or item.reserved:
            return chunk, None, chunk.failure or ledger.Failure.NOT_PROTECTED
        c.store.pin(item)
    survivors = [
        None if r in lost else rp.segment.array if rp.segment else None for r, rp in enumerate(g.ranks)
    ]
    return chunk, _Work(chunk, item, survivors), ledger.Failure.NONE


def _unpin(c: custodian.Custodian, work: _Work) -> None:
    with c.lock:
        c.store.unpin(work.item)


def _compute(g: group.Group, work: _Work, scratch: coding.Scratch) -> dict[int, npt.NDArray[np.uint8]] | None:
    """Reconstruct and verify (no lock held): survivors and rebuilt shards against their checksums."""
    ch = work.chunk
    return coding.rebuild_chunk(
        g.codec,
        g.protection,
        g.layout,
        work.survivors,
        ch.slots,
        work.item.buf,
        ch.checksums,
        scratch=scratch,
    )


def _check_generations(g: group.Group, expected: tuple[int, ...]) -> None:
    if g.generations() != expected:
        raise errors.Aborted(
            f"a rank of {g.name!r} was marked lost during the rebuild (generations {list(expected)} -> "
            f"{list(g.generations())}); nothing was marked valid: rebuild again"
        )


class Rebuilder:
    """A local rebuild in steps, so that nothing but the bookkeeping runs under the group's lock.

    `phases()` yields after each phase of each chunk (prepare under the lock, reconstruct and write
    without it, publish under it) and finally marks the lost ranks valid; `run()` drives it to the end.
    Every publish and the final marking check that no rank's generation changed since the start: a
    MarkLost during the rebuild ends it with Aborted and never marks the rank valid (bytes written
    before that went into the old, unlinked segment the rebuild captured, never into the new one)."""

    def __init__(
        self,
        c: custodian.Custodian,
        name: str,
        lost_ranks: list[int],
        *,
        request_ids: list[str],
        first_chunk: dict[str, int],
    ) -> None:
        self.c, self.name = c, name
        with c.locked(name) as g:
            self.g = g
            self.lost = _check_lost(g, lost_ranks)
            self.todo = _selection(g, request_ids, first_chunk)
            self.generations = g.generations()
            self.targets = {}
            for r in self.lost:
                seg = g.ranks[r].segment
                if seg is None:
                    raise errors.FailedPrecondition(
                        f"rank {r} of {name!r} has no pool to rebuild into: attach it"
                    )
                self.targets[r] = seg.array
        self.results: dict[str, RequestResult] = {
            rid: RequestResult(rid) for rid in (request_ids or [t[0] for t in self.todo])
        }
        self.drop: list[tuple[str, int]] = []
        self.scratch = coding.Scratch()
        self.report: Report | None = None

    def phases(self) -> Generator[str, None, None]:
        c, g = self.c, self.g
        start = time.perf_counter()
        for rid, idx, first in self.todo:
            res = self.results.setdefault(rid, RequestResult(rid))
            with c.locked(self.name):
                _check_generations(g, self.generations)
                if idx < first:
                    self.drop.append((rid, idx))
                    continue
                chunk, work, failure = _prepare(c, g, self.lost, rid, idx)
            if chunk is None:
                continue
            if work is None:
                res.failed.append((idx, failure))
                self.drop.append((rid, idx))
                continue
            yield "prepared"
            t0 = time.perf_counter()
            try:
                shards = _compute(g, work, self.scratch)
            finally:
                _unpin(c, work)
            if shards is None:
                res.failed.append((idx, ledger.Failure.CHECKSUM_MISMATCH))
                self.drop.append((rid, idx))
                continue
            for r, shard in shards.items():
                kvlayout.scatter_shard(shard, g.layout, work.chunk.slots, self.targets[r])
            yield "written"
            with c.locked(self.name):
                _check_generations(g, self.generations)
                req = g.ledger.requests.get(rid)
                if req is None or req.chunks.get(idx) is not work.chunk:
                    continue  # released or dropped meanwhile
                work.chunk.kv_lost = False
                res.rebuilt.append(idx)
                res.bytes_rebuilt += len(shards) * g.shard_nbytes
            c.metrics.rebuild_seconds.observe(time.perf_counter() - t0)
            yield "published"
        with c.locked(self.name):
            _check_generations(g, self.generations)
            for rid, idx in self.drop:
                c.drop_chunk(g, rid, idx)
            for r in self.lost:
                g.ranks[r].valid = True
            c.save_state()
            total = sum(r.bytes_rebuilt for r in self.results.values())
            g.bytes_rebuilt += total
            g.chunks_rebuilt += sum(len(r.rebuilt) for r in self.results.values())
            seconds = time.perf_counter() - start
            with c.lock:
                c.counters.rebuild_bytes += total
                c.counters.rebuild_seconds += seconds
        c.metrics.rebuild_bytes.inc(total)
        failed = sum(len(r.failed) for r in self.results.values())
        log.info("rebuilt", extra={"group": self.name, "lost": self.lost, "bytes": total, "failed": failed})
        self.report = Report(list(self.results.values()), total, seconds)

    def run(self) -> Report:
        for _ in self.phases():
            pass
        assert self.report is not None
        return self.report


def rebuild(
    c: custodian.Custodian,
    name: str,
    lost_ranks: list[int],
    *,
    request_ids: list[str],
    first_chunk: dict[str, int],
) -> Report:
    """Rebuild the lost ranks' shards of every selected protected chunk into their current pools.

    Mutates those pools, marks the lost ranks valid, drops skipped/failed chunks from the ledger.
    Raises NotFound, InvalidArgument, FailedPrecondition (a rank not listed as lost has no valid pool),
    Aborted (a rank was marked lost meanwhile: nothing marked valid)."""
    return Rebuilder(c, name, lost_ranks, request_ids=request_ids, first_chunk=first_chunk).run()


def stream(
    c: custodian.Custodian,
    name: str,
    lost_ranks: list[int],
    rank: int,
    *,
    request_ids: list[str],
    first_chunk: dict[str, int],
) -> Generator[Piece, None, None]:
    """Yield `rank`'s rebuilt shard of every selected chunk (one at a time; nothing local changes).

    While the consumer holds a piece, the stream keeps that one shard and nothing else (scratch is
    freed between chunks), so a stalled reader costs one shard. Raises NotFound, InvalidArgument (rank
    not among lost_ranks), FailedPrecondition before the first piece; Aborted when a rank of the group
    is marked lost meanwhile."""
    with c.locked(name) as g:
        lost = _check_lost(g, lost_ranks)
        if rank not in lost:
            raise errors.InvalidArgument(f"rank {rank} is not among the lost ranks {lost}")
        todo = _selection(g, request_ids, first_chunk)
        generations = g.generations()
    for rid, idx, first in todo:
        if idx < first:
            continue
        with c.locked(name):
            _check_generations(g, generations)
            chunk, work, failure = _prepare(c, g, lost, rid, idx)
        if chunk is None:
            continue
        data = None
        if work is not None:
            t0 = time.perf_counter()
            try:
                shards = _compute(g, work, coding.Scratch())
            finally:
                _unpin(c, work)
            if shards is None:
                failure = ledger.Failure.CHECKSUM_MISMATCH
            else:
                data = bytes(shards[rank])
                del shards
                with c.lock:
                    c.counters.rebuild_bytes += g.shard_nbytes
                    c.counters.rebuild_seconds += time.perf_counter() - t0
                c.metrics.rebuild_bytes.inc(g.shard_nbytes)
        yield Piece(rid, idx, chunk.slots, data, failure)


def plan(
    c: custodian.Custodian,
    name: str,
    lost_ranks: list[int],
    *,
    prefill_tokens_per_s: float,
    rebuild_bytes_per_s: float,
) -> planner.GroupPlan:
    """Hybrid-recovery plan from the ledger (ghostserve.sidecar.planner). Raises NotFound, InvalidArgument."""
    with c.locked(name) as g:
        if not lost_ranks:
            raise errors.InvalidArgument("no lost ranks given")
        for r in lost_ranks:
            g.check_rank(r)
        if not rebuild_bytes_per_s and c.counters.rebuild_seconds > 0:  # racy read of two floats: fine
            rebuild_bytes_per_s = c.counters.rebuild_bytes / c.counters.rebuild_seconds
        ledgers = []
        for rid in sorted(g.ledger.requests):
            req = g.ledger.requests[rid]
            n = req.committed_chunks()
            unprotected = frozenset(i for i in range(n) if req.chunks[i].state != ledger.State.PROTECTED)
            ledgers.append(planner.RequestLedger(rid, n, unprotected, g.ledger.tail_tokens(req)))
        try:
            calibration = planner.Calibration.from_prefill_speed(prefill_tokens_per_s, rebuild_bytes_per_s)
            return planner.plan_group(
                ledgers,
                lost_ranks=lost_ranks,
                world_size=g.settings.world_size,
                parity_shards=g.protection.parity_shards,
                chunk_tokens=g.protection.chunk_tokens,
                shard_bytes=g.shard_nbytes,
                calibration=calibration,
                code=g.protection.code,
            )
        except planner.PlanError as exc:
            raise errors.InvalidArgument(str(exc)) from exc
