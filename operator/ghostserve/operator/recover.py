"""Drive one replica's recorded recovery through its steps (record.py) against the API and sidecars.

Every step is idempotent, so an operator killed anywhere repeats at most the step it was in:
pod deletion carries a UID precondition; creation treats "already exists" as done once the old
pod is gone; MarkLost again wipes a pool that is already wiped; Rebuild again rewrites the same
bytes; MoveGroup again resumes from what the target holds (0 bytes when it has all); DeleteGroup
treats NOT_FOUND as done. A sidecar step failing SIDECAR_ATTEMPTS times is given up and noted in
the record; the outcome then says what was lost (Degraded), never Succeeded with nothing rebuilt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

import kopf
from ghostserve.operator import crashpoints, faults, metrics, placement, record, sidecars, status
from ghostserve.operator import pods as podmodel
from ghostserve.operator.record import Recovery
from ghostserve.operator.stamps import now, now_iso, parse_iso

if TYPE_CHECKING:
    from ghostserve.operator.loopstate import LoopState as Reconciler

SIDECAR_ATTEMPTS = 3
RETRY_SECONDS = 1.0


async def advance(loop: Reconciler, rec: Recovery, spec: Mapping[str, Any]) -> float | None:
    """Run `rec`'s remaining steps; returns when it must wait (a delay, or None: wait for a signal)."""
    while True:
        step = record.next_step(rec)
        if not _nodes_known(loop, rec):
            return RETRY_SECONDS  # a fresh operator's node watch has not listed them: no address yet
        source, gid = _src(loop, rec, spec), _gid(loop, rec)
        crashpoints.reached(f"before:{step}")
        pod = loop.rt.view.pods(loop.key).get(rec.replica)
        if step == record.MARKED_LOST:
            lost = loop.rt.sidecars.mark_lost(source, gid, rec.lost_ranks, rec.kind)
            done, _ = await _sidecar(loop, rec, "markLost", lost)
            if not done:
                return RETRY_SECONDS
        elif step == record.POD_DELETED:
            # By name with the failed pod's UID as precondition, whatever the view shows (a fresh
            # operator's view may not have listed the pods yet): gone or replaced count as done.
            if rec.old_uid:
                await loop.rt.kube.delete_pod(loop.namespace, _pod_name(loop, rec), uid=rec.old_uid)
        elif step == record.REBUILT:
            rebuild = loop.rt.sidecars.plan_and_rebuild(source, gid, rec.lost_ranks)
            done, out = await _sidecar(loop, rec, "rebuild", rebuild)
            if not done:
                return RETRY_SECONDS
            if isinstance(out, sidecars.RebuildOutcome):
                rec.bytes_rebuilt, rec.chunks_rebuilt = out.bytes_rebuilt, out.chunks_rebuilt
                rec.chunks_recomputed = out.chunks_recomputed
            if rec.chunks_rebuilt == 0 and rec.group_found:
                await _rebuilt_before(loop, rec, source, gid)
        elif step == record.PLACED:
            if not rec.target and not await _place(loop, rec, spec):
                if _expired(loop, rec):
                    why = f"no node for the replacement: {rec.unschedulable}"
                    return await finish(loop, rec, spec, failed=why)
                return loop.rt.config.resync_seconds  # node events wake us sooner
        elif step == record.KV_READY:
            done = await _kv_ready(loop, rec, spec)
            if not done:
                return RETRY_SECONDS
        elif step == record.POD_CREATED:
            if pod is not None and podmodel.uid_of(pod) == rec.old_uid:
                return None  # the failed pod is still terminating: its DELETED event wakes us
            if pod is None:
                manifest = podmodel.build_replica_pod(
                    loop.namespace,
                    loop.name,
                    spec,
                    rec.replica,
                    pin_node=rec.target,
                    avoid_nodes=rec.avoid,
                    node_access=loop.rt.config.node_access,
                )
                created = await loop.rt.kube.create_pod(loop.namespace, loop.adopted(manifest))
                crashpoints.reached("after:createPod")
                if not created:  # a pod of that name exists the view has not shown yet: look again
                    return RETRY_SECONDS
            rec.replaced_at = now_iso()
        elif step == record.RUNNING:
            state = await _running(loop, rec, pod)
            if state == "replan":
                continue
            if state == "failed":
                return await finish(loop, rec, spec, failed=f"replacement pod failed: {_pod_fault(pod)}")
            if state == "waiting":
                if _expired(loop, rec):
                    return await finish(loop, rec, spec, failed="replacement not ready in time")
                return None
        elif step == record.RELEASED:
            stale = [n for n in rec.stale_copies if n != rec.target]
            for node in ([rec.source] if record.moves(rec) else []) + stale:
                call = loop.rt.sidecars.delete_group(loop.address(node, spec), _gid(loop, rec))
                done, _ = await _sidecar(loop, rec, "deleteGroup", call)
                if not done:
                    return RETRY_SECONDS
        elif step == record.DONE:
            return await finish(loop, rec, spec)
        rec.step, rec.attempts = step, 0
        await loop.save(rec)
        loop.log.info("recovery-step", extra={"recovery": rec.id, "replica": rec.replica, "step": step})


async def _rebuilt_before(loop: Reconciler, rec: Recovery, source: str, gid: str) -> None:
    """Our Rebuild restored nothing: count what the source sidecar rebuilt into the group since the
    fault was detected, by anyone (an attempt of ours cut short by a restart, or the engine at attach,
    after which the requests may have finished and left the ledger). A rebuild that did happen is
    reported with the sidecar's figures, never as 0 bytes or Degraded; none at all stays Degraded."""
    try:
        figures = await loop.rt.sidecars.describe(source, gid)
    except Exception as exc:  # the outcome then says what our own Rebuild reported
        rec.note(f"DescribeGroup after Rebuild: {str(exc)[:200]}")
        return
    if figures is None:
        return
    chunks = figures.chunks_rebuilt - rec.rebuilt_baseline_chunks
    if chunks > 0:
        rec.chunks_rebuilt = chunks
        rec.bytes_rebuilt = max(0, figures.bytes_rebuilt - rec.rebuilt_baseline_bytes)
        rec.note(f"rebuilt before this Rebuild: {chunks} chunks, {rec.bytes_rebuilt} bytes (sidecar figures)")


def _nodes_known(loop: Reconciler, rec: Recovery) -> bool:
    """The source and target Nodes are in the view (their InternalIPs make the sidecar addresses), or
    the view had time to list them (then a missing one is gone and its calls fail for real)."""
    wanted = [n for n in (rec.source, rec.target) if n]
    return loop.rt.settled() or all(loop.rt.view.node(n) is not None for n in wanted)


def _pod_name(loop: Reconciler, rec: Recovery) -> str:
    return podmodel.replica_pod_name(loop.name, rec.replica)


def _gid(loop: Reconciler, rec: Recovery) -> str:
    return loop.group_id(rec.replica)


def _src(loop: Reconciler, rec: Recovery, spec: Mapping[str, Any]) -> str:
    return loop.address(rec.source, spec)


async def _sidecar(loop: Reconciler, rec: Recovery, what: str, call: Awaitable[Any]) -> tuple[bool, Any]:
    """(done, result): not done means retry later; done with None when given up after failures."""
    try:
        result = await call
    except Exception as exc:  # sidecar down or refusing: retry, then give the step up (noted)
        rec.attempts += 1
        kopf.warn(loop.body, reason="SidecarError", message=f"replica {rec.replica}: {what}: {exc}")
        if rec.attempts >= SIDECAR_ATTEMPTS:
            rec.note(f"{what} given up: {str(exc)[:200]}")
            return True, None
        await loop.save(rec)
        return False, None
    crashpoints.reached(f"after:{what}")
    return True, result


async def _place(loop: Reconciler, rec: Recovery, spec: Mapping[str, Any]) -> bool:
    """Choose the replacement's node; False (with an Event and the reason recorded) when none fits."""
    used = placement.gpus_in_use(loop.rt.view.all_pods(), ignore_uids=[rec.old_uid])
    # Other replicas recovering whose KV sits on a live node keep that node's GPUs for their own swap.
    need = int(spec["engine"]["tensorParallel"])
    for other in loop.in_flight.values():
        if other.replica != rec.replica and other.source_alive and not other.target:
            used[other.source] = used.get(other.source, 0) + need
    chosen = placement.choose(
        loop.rt.view.nodes(),
        used,
        spec,
        source=rec.source if rec.source_alive and not rec.reset else None,
        avoid=rec.avoid,
        bad_gpus=loop.rt.view.bad_gpus(),
    )
    if chosen.node is None:
        if rec.unschedulable != chosen.reason:
            rec.unschedulable = chosen.reason
            message = f"replica {rec.replica}: {chosen.reason}"
            kopf.warn(loop.body, reason="ReplacementUnschedulable", message=message)
            await loop.save(rec)
        return False
    rec.target, rec.unschedulable = chosen.node, ""
    kopf.event(
        loop.body,
        type="Normal",
        reason="ReplacementPlaced",
        message=f"replica {rec.replica}: {'same' if chosen.same_node else 'another'} node: {chosen.reason}",
    )
    return True


async def _kv_ready(loop: Reconciler, rec: Recovery, spec: Mapping[str, Any]) -> bool:
    """Put the replica's KV where the replacement will attach: moved, reset, or already there."""
    if rec.reset:
        for node in sorted({n for n in (rec.source if rec.source_alive else "", rec.target) if n}):
            call = loop.rt.sidecars.delete_group(loop.address(node, spec), _gid(loop, rec))
            done, _ = await _sidecar(loop, rec, "deleteGroup", call)
            if not done:
                return False
        kopf.event(
            loop.body,
            type="Normal",
            reason="SidecarGroupReset",
            message=f"replica {rec.replica}: faultPolicy group: sidecar group deleted, its KV is recomputed",
        )
        return True
    if not record.moves(rec):
        return True
    target = loop.address(rec.target, spec)
    move = loop.rt.sidecars.move_group(_src(loop, rec, spec), _gid(loop, rec), target)
    done, out = await _sidecar(loop, rec, "moveGroup", move)
    if not done:
        return False
    if isinstance(out, sidecars.MoveOutcome):
        rec.bytes_moved = out.bytes_moved
        if out.bytes_moved == 0:
            # Idempotent MoveGroup: 0 when the target already held all of it (an earlier attempt, cut
            # short by a restart, moved it). Count what the target verifiably holds.
            try:
                held = await loop.rt.sidecars.describe(target, _gid(loop, rec))
            except Exception as exc:
                held = None
                rec.note(f"DescribeGroup on the target after MoveGroup: {exc}")
            if held is not None and held.world_size and held.valid_ranks == held.world_size:
                rec.bytes_moved = held.pool_bytes
    if rec.target not in rec.stale_copies:
        rec.stale_copies = [*rec.stale_copies, rec.target]  # freed if the replacement ends up elsewhere
    return True


async def _running(loop: Reconciler, rec: Recovery, pod: Mapping[str, Any] | None) -> str:
    """ready | waiting | failed | replan (the pinned replacement cannot be scheduled)."""
    if pod is None or podmodel.uid_of(pod) == rec.old_uid:
        rec.step = record.KV_READY  # the replacement vanished (deleted by someone): create it again
        return "waiting" if pod is not None else "replan"
    why = status.unschedulable(pod)
    if why is not None and rec.target:
        kopf.warn(
            loop.body,
            reason="ReplacementUnschedulable",
            message=f"replica {rec.replica}: the scheduler cannot place it on {rec.target}: {why}; "
            "choosing another node",
        )
        await loop.rt.kube.delete_pod(loop.namespace, pod["metadata"]["name"], uid=podmodel.uid_of(pod))
        rec.old_uid = podmodel.uid_of(pod) or rec.old_uid  # wait for this one to go before creating again
        rec.avoid = sorted({*rec.avoid, rec.target})
        rec.unschedulable, rec.target, rec.step = why[:300], "", record.REPLAN
        await loop.save(rec)
        return "replan"
    if faults.classify_pod(pod) is not None:
        return "failed"
    return "ready" if status.pod_ready(pod) else "waiting"


def _pod_fault(pod: Mapping[str, Any] | None) -> str:
    fault = faults.classify_pod(pod) if pod is not None else None
    return fault.message if fault is not None else "unknown"


def _expired(loop: Reconciler, rec: Recovery) -> bool:
    return now() - (parse_iso(rec.detected_at) or 0) > loop.rt.config.recovery_timeout_seconds


async def finish(
    loop: Reconciler, rec: Recovery, spec: Mapping[str, Any], *, failed: str | None = None
) -> float | None:
    """Close the record: lastRecovery, counters, Event; the record leaves status.inFlight."""
    crashpoints.reached("before:finish")
    outcome, kv, message = record.outcome(rec, failed=failed)
    recovered = now_iso()
    seconds = (parse_iso(recovered) or 0) - (parse_iso(rec.detected_at) or 0)
    ranks = rec.lost_ranks or list(range(int(spec["engine"]["tensorParallel"])))
    last = status.last_recovery(
        {"kind": rec.kind, "reason": rec.reason, "group": rec.replica, "ranks": ranks}
        | {"detectedAt": rec.detected_at},
        outcome=outcome,
        recovered_at=recovered,
        seconds=seconds,
        bytes_rebuilt=rec.bytes_rebuilt,
        chunks_rebuilt=rec.chunks_rebuilt,
        chunks_recomputed=rec.chunks_recomputed,
        bytes_moved=rec.bytes_moved,
        kv=kv,
        message=message,
        source=rec.source,
        target=rec.target,
    )
    rows = [dict(r) for r in loop.status.get("ranks") or []]
    for row in rows:  # count the recovery on the ranks it replaced (persisted with the record's end)
        if row.get("group") == rec.replica and row.get("rank") in ranks:
            row["restarts"] = int(row.get("restarts", 0)) + 1
    await loop.save(
        drop=rec.replica, lastRecovery=last, recoveries=int(loop.status.get("recoveries", 0)) + 1, ranks=rows
    )
    loop.figures_at = 0.0  # fresh protection figures after a recovery
    metrics.RECOVERIES.labels(rec.kind, outcome).inc()
    metrics.TIME_TO_RECOVER.labels(rec.kind).observe(seconds)
    metrics.BYTES_REBUILT.inc(rec.bytes_rebuilt)
    kopf.event(
        loop.body,
        type="Normal" if outcome == record.SUCCEEDED else "Warning",
        reason=f"Recovery{outcome}",
        message=f"{rec.kind} fault ({rec.reason}) of replica {rec.replica}: {outcome} in {seconds:.2f}s; "
        f"KV {kv}: {message}; {rec.bytes_rebuilt} bytes rebuilt, {rec.bytes_moved} moved, "
        f"{rec.chunks_recomputed} chunks recomputed",
    )
    return None
