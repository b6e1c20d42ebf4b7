"""Recovery of the reference engine after rank processes died.

1. Kill the rest of the generation and start a new one; ranks re-attach to their pools. A rank whose
   pool the sidecar marked lost (device fault) attaches to a fresh pool with needs_rebuild set.
2. Resume every request on every rank (slot tables and tokens).
3. Process fault: done, nothing rebuilt. Device fault: ask the sidecar for a hybrid plan
   (PlanRecovery, calibrated with the measured prefill speed), rebuild chunks >= r from survivors +
   parity in the sidecar *while* the ranks recompute chunks < r, then recompute what could not be
   rebuilt and the unprotected tail, in position order, and commit the recomputed chunks again.

A fault during any of this makes the caller (resilience.recover) start over; the lost ranks are kept
in ``engine.pending_lost`` until a recovery completes, because after an interrupted one the sidecar
may already list them as valid (its Rebuild finished) although the recompute of their head did not.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence

from ghostserve.engine.reference import driver
from ghostserve.engine.reference import rank as rank_mod
from ghostserve.engine.reference.records import RecoveryReport  # re-exported (its historical home)
from ghostserve.v1 import sidecar_pb2 as pb


def recover(engine: driver.Driver, dead: Sequence[int]) -> RecoveryReport:
    """Bring ``engine`` back to serving after ranks ``dead`` died. Mutates the engine's cluster, the
    lost ranks' pools (via the sidecar) and every rank's request tables. Raises EngineError when the
    group cannot be restored."""
    t0 = time.perf_counter()
    assert engine.cluster is not None
    engine.cluster.kill_all()
    engine.start()
    lost = sorted({r for r, bad in enumerate(engine.needs_rebuild) if bad} | engine.pending_lost)
    engine.pending_lost = set(lost)
    report = RecoveryReport("device" if lost else "process", sorted(dead), lost)
    engine.resume_all()
    engine.hook("restore")
    if not lost:
        _recommit(engine)
    report.restart_s = time.perf_counter() - t0
    if lost:
        t1 = time.perf_counter()
        _restore(engine, lost, report)
        report.restore_s = time.perf_counter() - t1
    engine.pending_lost = set()
    report.total_s = time.perf_counter() - t0
    return report


def _restore(engine: driver.Driver, lost: list[int], report: RecoveryReport) -> None:
    t = engine.opts.chunk_tokens
    active = [r for r in engine.requests.values() if r.kv_len]
    for req in active:
        engine.session.record_tokens(
            req.request_id, req.tokens, prompt_tokens=len(req.prompt), max_new_tokens=req.max_new_tokens
        )
    plan = engine.client.plan_recovery(
        group=engine.group,
        lost_ranks=lost,
        prefill_tokens_per_s=engine.prefill_tokens_per_s(),
        rebuild_bytes_per_s=_rebuild_rate(engine),
    )
    plans = {p.request_id: p for p in plan.requests}
    first = {
        req.request_id: plans[req.request_id].recompute_chunks if req.request_id in plans else 0
        for req in active
    }
    report.plan = dict(first)
    # Rebuild (sidecar) and recompute of the first r chunks (ranks) run at the same time. The rebuild
    # also runs when it has nothing to do (r = n everywhere): it is what marks the lost pools valid again.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_rebuild, engine, lost, first)
        engine.hook("rebuild")
        head = {rid: [(0, r * t)] for rid, r in first.items() if r}
        th = time.perf_counter()
        report.tokens_recomputed += engine.replay(head)
        report.head_s = time.perf_counter() - th
        report.chunks_recomputed += sum(first.values())
        rebuilt = future.result()
    rebuilt_chunks: dict[str, set[int]] = {rid: set() for rid in first}
    report.rebuild_s = rebuilt.seconds
    report.bytes_rebuilt = rebuilt.bytes_rebuilt
    for rr in rebuilt.requests:
        report.chunks_rebuilt += len(rr.rebuilt_chunks)
        report.failed_chunks += len(rr.failed_chunks)
        for f in rr.failed_chunks:
            name = pb.ChunkFailure.Name(f.reason)
            report.failures[name] = report.failures.get(name, 0) + 1
        rebuilt_chunks.setdefault(rr.request_id, set()).update(rr.rebuilt_chunks)
    # Every position past the recomputed head that the rebuild did not restore is recomputed, in
    # position order: the plan's unprotected chunks, failed rebuilds, chunks the ledger never saw (a
    # sidecar restart) and the tail after the last committed chunk.
    after: dict[str, list[tuple[int, int]]] = {}
    for req in active:
        rid = req.request_id
        spans = []
        for c in range(first[rid], -(-req.kv_len // t)):
            if c not in rebuilt_chunks[rid]:
                spans.append((c * t, min((c + 1) * t, req.kv_len)))
        report.chunks_recomputed += sum(1 for a, b in spans if b - a == t)
        if spans:
            after[rid] = _merge(spans)
    ta = time.perf_counter()
    report.tokens_recomputed += engine.replay(after, commit=True)
    report.after_s = time.perf_counter() - ta
    # The sidecar dropped the chunks it did not rebuild; commit the recomputed head again (the tail and
    # the other recomputed chunks were committed by the replay itself).
    assert engine.cluster is not None
    for rid, r in first.items():
        if r:
            engine.cluster.call(rank_mod.Commit(rid, tuple(range(r))))


def _recommit(engine: driver.Driver) -> None:
    """Commit again every complete chunk the sidecar does not list as committed: commits queued in the
    killed ranks never arrived (commits are idempotent, so over-committing is harmless)."""
    assert engine.cluster is not None
    known = {
        r.request_id: r.chunks_committed for r in engine.client.describe_group(group=engine.group).requests
    }
    t = engine.opts.chunk_tokens
    for req in engine.requests.values():
        missing = tuple(range(known.get(req.request_id, 0), req.kv_len // t))
        if missing and engine.opts.protect:
            engine.cluster.call(rank_mod.Commit(req.request_id, missing))


def _rebuild(engine: driver.Driver, lost: list[int], first: dict[str, int]) -> pb.RebuildReport:
    # A separate channel: the driver's main client stays free for the engine thread.
    from ghostserve.sidecar import client as client_mod

    with client_mod.SidecarClient(engine.sidecar, timeout=600.0) as client:
        return client.rebuild(
            group=engine.group, lost_ranks=lost, request_ids=sorted(first), first_chunk=first
        )


def _rebuild_rate(engine: driver.Driver) -> float:
    """Measured rebuild bandwidth if the sidecar has rebuilt before, else its encode bandwidth."""
    if engine.opts.plan_rebuild_bytes_per_s is not None:
        return engine.opts.plan_rebuild_bytes_per_s
    stats = engine.client.get_stats()
    if stats.rebuild_seconds > 0:
        return float(stats.rebuild_bytes / stats.rebuild_seconds)
    if stats.encode_seconds > 0:
        return float(stats.encode_bytes / stats.encode_seconds)
    return 0.0


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
