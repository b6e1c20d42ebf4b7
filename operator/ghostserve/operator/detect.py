"""Fault detection: classify every replica not already recovering and start a recovery per faulty
replica (each placed by its own faults), within the hourly budget and the backoff.

A GPU that fails usually kills the engine too, and the pod's termination and the sidecar's Xid event
arrive in either order. So a replica showing only a process fault waits SETTLE_SECONDS for a GPU
event before its recovery starts, and a GPU fault arriving while a recovery of that replica has not
yet created the replacement joins it (its rank is marked lost and rebuilt) instead of waiting for a
second recovery that would wipe the new engine's pool.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import kopf
from ghostserve.operator import crashpoints, faults, metrics, record, remediation, status
from ghostserve.operator.pods import uid_of
from ghostserve.operator.stamps import now, now_iso, parse_iso

if TYPE_CHECKING:
    from ghostserve.operator.loopstate import LoopState as Reconciler

SETTLE_SECONDS = 1.0
# Steps before the replacement pod exists: a device fault found then joins the recovery.
_JOINABLE = {
    record.DETECTED,
    record.MARKED_LOST,
    record.POD_DELETED,
    record.REBUILT,
    record.PLACED,
    record.KV_READY,
    record.REPLAN,
}


async def detect(loop: Reconciler, spec: Mapping[str, Any], pods: Mapping[int, Any]) -> float | None:
    """Start recoveries for faulty replicas; returns a delay when one waits for its backoff."""
    rec_spec, delays = spec["recovery"], []
    found_any = False
    for replica, pod in sorted(pods.items()):
        if replica in loop.in_flight:
            await _join(loop, loop.in_flight[replica])
            continue
        if replica >= int(spec["engine"]["replicas"]):
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        if node and loop.rt.view.node(node) is None and not loop.rt.settled():
            continue  # its Node is not listed yet: neither its faults nor its sidecar's address are known
        found = faults.replica_faults(
            pod,
            loop.rt.view.node(node),
            loop.rt.view.gpu_faults(node),
            group=loop.group_id(replica),
            uuid_ranks=loop.uuid_ranks(replica, node),
            known_restarts=loop.kubelet_seen.setdefault(uid_of(pod) or "", status.pod_restarts(pod)),
            gpu_conditions=loop.rt.config.gpu_conditions,
            node_deleted=loop.rt.view.node_deleted(node),
        )
        _warn_unattributed(loop, node)
        if not found:
            continue
        found_any = True
        if all(f.kind == faults.PROCESS for _, f in found):
            seen = loop.first_seen.setdefault(uid_of(pod) or "", time.monotonic())
            left = SETTLE_SECONDS - (time.monotonic() - seen)
            if left > 0:
                delays.append(left)
                continue
        worst = faults.worst(f for _, f in found)
        assert worst is not None and node is not None
        at = now()
        starts = [parse_iso(s) for s in loop.status.get("recentRecoveries") or []]
        recent = [t for t in starts if t is not None]
        decision = remediation.decide(
            worst,
            recent_recoveries=recent,
            now=at,
            max_per_hour=rec_spec["maxRecoveriesPerHour"],
            last_finished=parse_iso((loop.status.get("lastRecovery") or {}).get("recoveredAt")),
            backoff_seconds=rec_spec["backoffSeconds"],
        )
        if decision.action == remediation.GIVE_UP:
            if loop.gave_up is None:
                message = f"{worst.message}; {decision.message}"
                kopf.warn(loop.body, reason="RecoveryBudgetExhausted", message=message)
            loop.gave_up = decision.message
            continue
        if decision.action == remediation.WAIT:
            delays.append(decision.delay)
            continue
        uid = uid_of(pod) or ""
        loop.kubelet_seen[uid] = status.pod_restarts(pod)
        protected = bool(spec["protection"]["enabled"]) and spec["protection"]["code"] != "none"
        rec = remediation.plan(
            found,
            decision,
            replica=replica,
            old_uid=uid,
            node=node,
            protected=protected,
            policy=rec_spec["faultPolicy"],
            detected_at=now_iso(),
            recovery_id=uuid.uuid4().hex[:12],
        )
        if rec.source_alive:
            await _expected(loop, spec, rec)
        metrics.FAULTS.labels(worst.kind, worst.reason).inc()
        detail = ", ".join(
            f"{'replica' if r is None else f'rank {r}'}: {f.reason}" + (f" ({f.gpu})" if f.gpu else "")
            for r, f in found
        )
        kopf.warn(
            loop.body,
            reason=f"Fault{worst.kind.title()}",
            message=f"replica {replica} on {node}: {detail}: {worst.message} -> {decision.action}"
            + (f", ranks {rec.lost_ranks} lost" if rec.lost_ranks else ""),
        )
        for _, f in found:
            if f.gpu:
                loop.rt.view.clear_gpu(node, f.gpu)  # acted on; it must not start a second recovery
        kept = [s for s in loop.status.get("recentRecoveries") or [] if (parse_iso(s) or 0) > at - 3600]
        await loop.save(rec, recentRecoveries=[*kept, rec.detected_at])
    if not found_any and not loop.in_flight:
        loop.gave_up = None
    return min(delays) if delays else None


def faulted(loop: Reconciler, spec: Mapping[str, Any], pods: Mapping[int, Any]) -> bool:
    """Whether a replica not yet recovering shows a fault in the view now (what `detect` acts on,
    before its settle wait, budget and backoff); changes nothing. A replica on a Node not listed yet
    is not judged: the node's event asks again."""
    view = loop.rt.view
    for replica, pod in pods.items():
        if replica in loop.in_flight or replica >= int(spec["engine"]["replicas"]):
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        if node and view.node(node) is None:
            continue
        found = faults.replica_faults(
            pod,
            view.node(node),
            view.gpu_faults(node),
            group=loop.group_id(replica),
            uuid_ranks=loop.uuid_ranks(replica, node),
            known_restarts=loop.kubelet_seen.get(uid_of(pod) or "", status.pod_restarts(pod)),
            gpu_conditions=loop.rt.config.gpu_conditions,
            node_deleted=view.node_deleted(node),
        )
        if found:
            return True
    return False


async def _join(loop: Reconciler, rec: record.Recovery) -> None:
    """Add device faults of the replica's GPUs found while its recovery has not created the replacement."""
    if rec.step not in _JOINABLE or not rec.source_alive or rec.reset:
        return
    group = loop.group_id(rec.replica)
    uuid_ranks = loop.uuid_ranks(rec.replica, rec.source)
    new = []
    for fault in loop.rt.view.gpu_faults(rec.source):
        rank = faults.attribute(fault, group=group, uuid_ranks=uuid_ranks)
        if rank is not None and rank not in rec.lost_ranks and fault.kind == faults.DEVICE:
            new.append((rank, fault))
    if not new:
        return
    for rank, fault in new:
        rec.faults.append(record.RankFault(rank, fault.kind, fault.reason, fault.gpu or ""))
        loop.rt.view.clear_gpu(rec.source, fault.gpu)
    rec.lost_ranks = sorted({*rec.lost_ranks, *(r for r, _ in new)})
    if rec.kind == faults.PROCESS:
        rec.kind, rec.reason, rec.message = faults.DEVICE, new[0][1].reason, new[0][1].message[:500]
    # Start over from the top: every step is idempotent, and MarkLost + Rebuild now cover the new ranks.
    # The target is chosen again (a process recovery had pinned the old node without checking GPUs).
    rec.action, rec.step, rec.attempts = record.RESCHEDULE, record.DETECTED, 0
    if rec.target and rec.target != rec.source:
        rec.stale_copies = sorted({*rec.stale_copies, rec.target})
    rec.target = ""
    kopf.warn(
        loop.body,
        reason="FaultDevice",
        message=f"replica {rec.replica} on {rec.source}: "
        + ", ".join(f"rank {r}: {f.reason} ({f.gpu})" for r, f in new)
        + f" joins recovery {rec.id}; ranks {rec.lost_ranks} lost",
    )
    await loop.save(rec)


async def _expected(loop: Reconciler, spec: Mapping[str, Any], rec: Any) -> None:
    """What the source sidecar held before anything is changed: the bytes a rebuild or move must bring
    back (a recovery that brings back none of them is Degraded, not Succeeded)."""
    try:
        figures = await loop.rt.sidecars.describe(loop.address(rec.source, spec), loop.group_id(rec.replica))
    except Exception as exc:  # unreachable: fall back on the last figures of that node
        loop.log.debug("describe-group-failed", extra={"when": "before-recovery", "error": str(exc)})
        asked, figures = loop.figures.get(rec.replica, ("", None))
        if asked != rec.source:
            figures = None
    crashpoints.reached("after:describe")
    if figures is not None:
        rec.group_found = True
        rec.expected_chunks = figures.protected_chunks
        rec.rebuilt_baseline_bytes = figures.bytes_rebuilt
        rec.rebuilt_baseline_chunks = figures.chunks_rebuilt


def _warn_unattributed(loop: Reconciler, node: str | None) -> None:
    """A node GPU taint or condition that names no GPU cannot be pinned on a rank: say so once."""
    view_node = loop.rt.view.node(node)
    if view_node is None:
        return
    for fault in faults.node_gpu_faults(view_node, gpu_conditions=loop.rt.config.gpu_conditions):
        if fault.gpu is None:
            loop.warn_once(
                f"unattributed:{node}:{fault.message}",
                "GpuSignalUnattributed",
                f"node {node}: {fault.message} names no GPU UUID; no rank is marked lost for it "
                "(the sidecar's NVML stream attributes GPU faults)",
            )
