"""Decide what to do about a replica's faults, and the record of the recovery that does it (pure)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ghostserve.operator import faults, record

WAIT = "Wait"  # inside the backoff window after the previous recovery
GIVE_UP = "GiveUp"  # recovery budget for the last hour is spent
RESTART_IN_PLACE, RESCHEDULE, RECORD_ONLY = record.RESTART_IN_PLACE, record.RESCHEDULE, record.RECORD_ONLY
HOUR = 3600.0
# Node faults after which the node's sidecar (and the KV it held) is gone: nothing to mark, rebuild or move.
SOURCE_GONE = frozenset({"NodeNotReady", "NodeDeleted"})


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str
    delay: float = 0.0  # WAIT: seconds until a recovery may start
    message: str = ""


def decide(
    fault: faults.Fault,
    *,
    recent_recoveries: Sequence[float],
    last_finished: float | None,
    now: float,
    max_per_hour: int,
    backoff_seconds: float,
) -> Decision:
    """Whether (and how) to recover from `fault` (the replica's worst) now, given recent recoveries.

    The hourly budget is checked before the backoff, so an exhausted budget is reported at once."""
    in_last_hour = [t for t in recent_recoveries if now - t < HOUR]
    if len(in_last_hour) >= max_per_hour:
        return Decision(
            GIVE_UP, message=f"{len(in_last_hour)} recoveries in the last hour (max {max_per_hour})"
        )
    if last_finished is not None and now - last_finished < backoff_seconds:
        wait = backoff_seconds - (now - last_finished)
        return Decision(WAIT, delay=wait, message=f"backoff: {wait:.1f}s left")
    if fault.kind == faults.PROCESS and fault.reason == "ContainerRestarted":
        return Decision(RECORD_ONLY, message="kubelet restarted the engine in place")
    if fault.kind == faults.PROCESS:
        return Decision(RESTART_IN_PLACE)
    return Decision(RESCHEDULE)


def plan(
    found: Sequence[tuple[int | None, faults.Fault]],
    decision: Decision,
    *,
    replica: int,
    old_uid: str,
    node: str,
    protected: bool,
    policy: str,
    detected_at: str,
    recovery_id: str,
) -> record.Recovery:
    """A new recovery of one replica at step Detected, from every fault it shows.

    Only device-faulted ranks are lost (a process fault in the same replica loses nothing: its pools
    are in custody). A node fault that took the sidecar leaves nothing to mark lost, rebuild or move."""
    worst = faults.worst(f for _, f in found)
    assert worst is not None
    lost = sorted({r for r, f in found if r is not None and f.kind == faults.DEVICE})
    source_alive = not any(f.kind == faults.NODE and f.reason in SOURCE_GONE for _, f in found)
    avoid = [node] if worst.kind == faults.NODE else []
    return record.Recovery(
        id=recovery_id,
        replica=replica,
        kind=worst.kind,
        reason=worst.reason,
        message=worst.message[:500],
        action=decision.action,
        detected_at=detected_at,
        faults=[
            record.RankFault(-1 if r is None else r, f.kind, f.reason, f.gpu or "")
            for r, f in sorted(found, key=lambda x: -1 if x[0] is None else x[0])
        ],
        lost_ranks=lost if source_alive else [],
        old_uid=old_uid,
        source=node,
        source_alive=source_alive,
        protected=protected,
        reset=policy == "group",
        # A process fault restarts in place: the pods' pools are on this node's sidecar.
        target=node if decision.action == RESTART_IN_PLACE else "",
        avoid=avoid,
    )
