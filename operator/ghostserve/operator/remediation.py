"""Decide what to do about a classified fault, and in which recorded steps (pure).

A recovery is a record kept in the deployment's `status.recovery` (camelCase dict) so that an
operator restarted half-way finishes it: `plan_recovery` creates the record, `next_step` says
which step comes after the one recorded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ghostserve.operator import faults

# Actions.
RESTART_IN_PLACE = "RestartInPlace"  # process fault: same node, pools re-attached, nothing rebuilt
RESCHEDULE = "Reschedule"  # device/node fault: elsewhere (other GPU or other node)
RECORD_ONLY = "RecordOnly"  # kubelet already restarted the container in place
WAIT = "Wait"  # inside the backoff window after the previous recovery
GIVE_UP = "GiveUp"  # recovery budget for the last hour is spent

# Steps of a recovery, in order. Each is recorded before the next one starts.
DETECTED = "Detected"
MARKED_LOST = "MarkedLost"  # device fault: the node's sidecar wiped and invalidated the lost pools
PODS_DELETED = "PodsDeleted"
REPLACEMENTS_CREATED = "ReplacementsCreated"
RUNNING = "ReplacementsRunning"
REBUILT = "Rebuilt"  # sidecar PlanRecovery + Rebuild done
DONE = "Done"
STEPS = (DETECTED, MARKED_LOST, PODS_DELETED, REPLACEMENTS_CREATED, RUNNING, REBUILT, DONE)

HOUR = 3600.0


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
    """Whether (and how) to recover from `fault` now, given the start times of recent recoveries.

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


def affected_ranks(failed: Iterable[int], *, policy: str, world_size: int) -> list[int]:
    """Ranks to replace: the failed ones (policy rank) or the whole group (policy group)."""
    return list(range(world_size)) if policy == "group" else sorted(set(failed))


def plan_recovery(
    fault: faults.Fault,
    decision: Decision,
    *,
    group: int,
    ranks: Iterable[int],
    old_pods: Mapping[int, str],
    protected: bool,
    detected_at: str,
    recovery_id: str,
) -> dict[str, Any]:
    """The in-flight record of a new recovery, at step DETECTED.

    `old_pods` maps rank -> UID of the failed pod, so that deletion never removes a replacement
    created by an earlier attempt. `protected`: the group's KV is erasure coded (rebuild possible)."""
    device = fault.kind == faults.DEVICE
    node_level = fault.kind == faults.NODE or (device and fault.node_wide)
    return {
        "id": recovery_id,
        "kind": fault.kind,
        "reason": fault.reason,
        "message": fault.message,
        "action": decision.action,
        "group": group,
        "ranks": sorted(set(ranks)),
        "oldPods": {str(r): uid for r, uid in sorted(old_pods.items())},
        "node": fault.node,
        "gpu": fault.gpu,
        "pinNode": fault.node if decision.action == RESTART_IN_PLACE else None,
        "preferNode": fault.node if device and not fault.node_wide else None,
        "avoidNodes": [fault.node] if node_level and fault.node else [],
        # Both names of the GPU: device plugins speak UUIDs, node-local tools indexes.
        "avoidGpus": sorted({g for g in (fault.gpu, fault.gpu_index) if g}) if device else [],
        # A device fault loses the rank's KV; the node's sidecar still holds parity and survivors.
        "markLost": device,
        "rebuild": device and protected,
        "detectedAt": detected_at,
        "step": DETECTED,
    }


def next_step(record: Mapping[str, Any]) -> str:
    """The step to run after the one `record` has reached (DONE stays DONE)."""
    step = record["step"]
    if step == DONE:
        return DONE
    following = STEPS[STEPS.index(step) + 1]
    if following == MARKED_LOST and not record.get("markLost"):
        following = PODS_DELETED
    if following == PODS_DELETED and record.get("action") == RECORD_ONLY:
        return DONE
    if following == REBUILT and not record.get("rebuild"):
        following = DONE
    return following
