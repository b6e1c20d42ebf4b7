"""Recovery of lost ranks: plan (hybrid recompute/rebuild), rebuild into local pools, or stream the
rebuilt shards to a replacement on another node.

Every rebuilt shard is checked against the xxh3 checksum recorded at encode time before it is used; a
mismatch is reported as CHECKSUM_MISMATCH and the bytes are never written. After a local rebuild, chunks
that were skipped (below first_chunk) or could not be rebuilt are dropped from the ledger: the engine
recomputes them and commits them again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Generator

import numpy as np
import numpy.typing as npt
from ghostserve.engine import planner
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import coding, core, errors, group, ledger

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


def _one(
    c: core.Custodian, g: group.Group, lost: list[int], rid: str, idx: int, scratch: coding.Scratch
) -> tuple[ledger.Chunk | None, dict[int, npt.NDArray[np.uint8]] | None, ledger.Failure]:
    """Rebuild one chunk into scratch. Caller holds the lock."""
    req = g.ledger.requests.get(rid)
    chunk = req.chunks.get(idx) if req else None
    if chunk is None:
        return None, None, ledger.Failure.NOT_PROTECTED
    if not g.protection.tolerates(len(lost), g.settings.world_size):
        return chunk, None, ledger.Failure.TOO_MANY_LOSSES
    item = c.store.get(g.owner(rid), idx)
    if chunk.state != ledger.State.PROTECTED or item is None or item.reserved:
        return chunk, None, chunk.failure or ledger.Failure.NOT_PROTECTED
    arrays = [None if r in lost else rp.segment.array if rp.segment else None for r, rp in enumerate(g.ranks)]
    shards = coding.rebuild_chunk(
        g.codec, g.protection, g.layout, arrays, chunk.slots, item.buf, chunk.checksums, scratch=scratch
    )
    if shards is None:
        return chunk, None, ledger.Failure.CHECKSUM_MISMATCH
    return chunk, shards, ledger.Failure.NONE


def rebuild(
    c: core.Custodian,
    name: str,
    lost_ranks: list[int],
    *,
    request_ids: list[str],
    first_chunk: dict[str, int],
) -> Report:
    """Rebuild the lost ranks' shards of every selected protected chunk into their current pools.

    Mutates those pools, marks the lost ranks valid, drops skipped/failed chunks from the ledger.
    Raises NotFound, InvalidArgument, FailedPrecondition (a rank not listed as lost has no valid pool)."""
    start = time.perf_counter()
    with c.lock:
        g = c.get(name)
        lost = _check_lost(g, lost_ranks)
        todo = _selection(g, request_ids, first_chunk)
    results: dict[str, RequestResult] = {
        rid: RequestResult(rid) for rid in (request_ids or [t[0] for t in todo])
    }
    drop: list[tuple[str, int]] = []
    scratch = coding.Scratch()
    for rid, idx, first in todo:
        res = results.setdefault(rid, RequestResult(rid))
        with c.lock:
            if c.groups.get(name) is not g:
                raise errors.NotFound(f"group {name!r} was deleted during the rebuild")
            if idx < first:
                drop.append((rid, idx))
                continue
            t0 = time.perf_counter()
            chunk, shards, failure = _one(c, g, lost, rid, idx, scratch)
            if chunk is None:
                continue
            if shards is None:
                res.failed.append((idx, failure))
                drop.append((rid, idx))
                continue
            for r, shard in shards.items():
                seg = g.ranks[r].segment
                assert seg is not None
                kvlayout.scatter_shard(shard, g.layout, chunk.slots, seg.array)
            nbytes = len(shards) * g.shard_nbytes
            chunk.kv_lost = False
            res.rebuilt.append(idx)
            res.bytes_rebuilt += nbytes
            c.metrics.rebuild_seconds.observe(time.perf_counter() - t0)
    with c.lock:
        if c.groups.get(name) is g:
            for rid, idx in drop:
                c.drop_chunk(g, rid, idx)
            for r in lost:
                g.ranks[r].valid = True
            c.save_state()
        total = sum(r.bytes_rebuilt for r in results.values())
        seconds = time.perf_counter() - start
        c.counters.rebuild_bytes += total
        c.counters.rebuild_seconds += seconds
        c.metrics.rebuild_bytes.inc(total)
    log.info(
        json.dumps(
            {
                "event": "rebuilt",
                "group": name,
                "lost": lost,
                "bytes": total,
                "failed": sum(len(r.failed) for r in results.values()),
            }
        )
    )
    return Report(list(results.values()), total, seconds)


def stream(
    c: core.Custodian,
    name: str,
    lost_ranks: list[int],
    rank: int,
    *,
    request_ids: list[str],
    first_chunk: dict[str, int],
) -> Generator[Piece, None, None]:
    """Yield `rank`'s rebuilt shard of every selected chunk (one at a time; nothing local changes).

    Raises NotFound, InvalidArgument (rank not among lost_ranks), FailedPrecondition before the first
    piece."""
    with c.lock:
        g = c.get(name)
        lost = _check_lost(g, lost_ranks)
        if rank not in lost:
            raise errors.InvalidArgument(f"rank {rank} is not among the lost ranks {lost}")
        todo = _selection(g, request_ids, first_chunk)
    scratch = coding.Scratch()
    for rid, idx, first in todo:
        if idx < first:
            continue
        with c.lock:
            if c.groups.get(name) is not g:
                return
            t0 = time.perf_counter()
            chunk, shards, failure = _one(c, g, lost, rid, idx, scratch)
            if chunk is None:
                continue
            data = bytes(shards[rank]) if shards is not None else None
            if shards is not None:
                c.counters.rebuild_bytes += g.shard_nbytes
                c.counters.rebuild_seconds += time.perf_counter() - t0
                c.metrics.rebuild_bytes.inc(g.shard_nbytes)
            slots = chunk.slots
        yield Piece(rid, idx, slots, data, failure)


def plan(
    c: core.Custodian,
    name: str,
    lost_ranks: list[int],
    *,
    prefill_tokens_per_s: float,
    rebuild_bytes_per_s: float,
) -> planner.GroupPlan:
    """Hybrid-recovery plan from the ledger (ghostserve.engine.planner). Raises NotFound, InvalidArgument."""
    with c.lock:
        g = c.get(name)
        if not lost_ranks:
            raise errors.InvalidArgument("no lost ranks given")
        for r in lost_ranks:
            g.check_rank(r)
        if not rebuild_bytes_per_s and c.counters.rebuild_seconds > 0:
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
