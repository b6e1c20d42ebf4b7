"""The deployment's status: ranks table, conditions, protection figures, recovery records (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ghostserve.operator import faults, phases

READY, PROTECTED, RECOVERING, DEGRADED = "Ready", "Protected", "Recovering", "Degraded"


def pod_ready(pod: Mapping[str, Any] | None) -> bool:
    """Running, not terminating, and its Ready condition is True."""
    if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_state(pod: Mapping[str, Any] | None) -> str:
    """Short state of a rank pod for the ranks table."""
    if pod is None:
        return "Missing"
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    if pod_ready(pod):
        return "Ready"
    fault = faults.classify_pod(pod, known_restarts=1 << 30)
    if fault is not None:
        return fault.reason
    if unschedulable(pod):
        return "Unschedulable"
    phase = (pod.get("status") or {}).get("phase") or "Pending"
    return "Scheduled" if phase == "Pending" and (pod.get("spec") or {}).get("nodeName") else str(phase)


def unschedulable(pod: Mapping[str, Any] | None) -> str | None:
    """The scheduler's message when it reported the pod unschedulable, else None."""
    for cond in ((pod or {}).get("status") or {}).get("conditions") or []:
        found = (cond.get("type"), cond.get("status"), cond.get("reason"))
        if found == ("PodScheduled", "False", "Unschedulable"):
            return str(cond.get("message") or "unschedulable")
    return None


def pod_restarts(pod: Mapping[str, Any] | None) -> int:
    if pod is None:
        return 0
    return sum(
        int(cs.get("restartCount") or 0) for cs in (pod.get("status") or {}).get("containerStatuses") or []
    )


def rank_row(
    group: int,
    rank: int,
    pod: Mapping[str, Any] | None,
    *,
    name: str,
    recorded_restarts: int,
    gpu: str = "",
) -> dict[str, Any]:
    """One row of status.ranks: `group` is the replica, `pod` its pod (every rank of a replica is in
    it), `gpu` the UUID the rank attached with (from the sidecar; empty when not known yet).
    `restarts` counts the recoveries this rank went through."""
    return {
        "group": group,
        "rank": rank,
        "pod": name,
        "node": ((pod or {}).get("spec") or {}).get("nodeName") or "",
        "gpu": gpu,
        "state": pod_state(pod),
        "restarts": recorded_restarts,
    }


def conditions(
    old: Sequence[Mapping[str, Any]],
    wanted: Mapping[str, tuple[str, str, str]],
    *,
    now: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """New condition list: `wanted` maps type -> (status, reason, message). lastTransitionTime only
    changes when the status of a type changes; types not in `wanted` are kept as they are. Each
    written condition carries the spec generation it was computed from (observedGeneration)."""
    by_type = {c["type"]: dict(c) for c in old if "type" in c}
    for type_, (status_, reason, message) in wanted.items():
        prev = by_type.get(type_)
        moved = prev is None or prev.get("status") != status_
        by_type[type_] = {
            "type": type_,
            "status": status_,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now if moved or prev is None else prev.get("lastTransitionTime", now),
        }
        if generation is not None:
            by_type[type_]["observedGeneration"] = generation
    order = [READY, PROTECTED, RECOVERING, DEGRADED]
    return [by_type[t] for t in order if t in by_type] + [c for t, c in by_type.items() if t not in order]


def protection_summary(
    *,
    enabled: bool,
    protected_chunks: int,
    unprotected_chunks: int,
    parity_bytes: int,
    known: bool = True,
) -> dict[str, Any]:
    """status.protection; `protected` is yes (at least one chunk has parity and none waits without
    it), partial (some committed chunks lack parity), no (nothing protected), or unknown (a sidecar
    did not answer or a replica's figures are missing: `known` False)."""
    if not enabled:
        label = "no"
    elif not known:
        label = "unknown"
    elif protected_chunks == 0:
        label = "no"
    elif unprotected_chunks:
        label = "partial"
    else:
        label = "yes"
    return {
        "protectedChunks": protected_chunks,
        "unprotectedChunks": unprotected_chunks,
        "parityBytes": parity_bytes,
        "protected": label,
    }


def last_recovery(
    record: Mapping[str, Any],
    *,
    outcome: str,
    recovered_at: str | None,
    seconds: float | None,
    bytes_rebuilt: int = 0,
    chunks_rebuilt: int = 0,
    chunks_recomputed: int = 0,
    bytes_moved: int = 0,
    kv: str | None = None,
    message: str | None = None,
    source: str | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """status.lastRecovery from a finished record (`group` = replica) and what the sidecars reported."""
    out: dict[str, Any] = {
        "kind": record["kind"],
        "reason": record["reason"],
        "group": record["group"],
        "rank": record["ranks"][0] if record["ranks"] else 0,
        "ranks": list(record["ranks"]),
        "detectedAt": record["detectedAt"],
        "outcome": outcome,
        "bytesRebuilt": bytes_rebuilt,
        "chunksRebuilt": chunks_rebuilt,
        "chunksRecomputed": chunks_recomputed,
    }
    optional = {"kv": kv, "message": message, "sourceNode": source, "targetNode": target}
    out |= {k: v for k, v in optional.items() if v}
    if bytes_moved:
        out["bytesMoved"] = bytes_moved
    if recovered_at is not None:
        out["recoveredAt"] = recovered_at
    if seconds is not None:
        out["seconds"] = round(seconds, 3)
    return out


def summary(
    *,
    spec_valid: bool,
    rows: Sequence[Mapping[str, Any]],
    recovery: Mapping[str, Any] | None,
    gave_up: str | None,
    ever_served: bool,
    protection: Mapping[str, Any],
    old_conditions: Sequence[Mapping[str, Any]],
    generation: int | None,
    now: str,
    in_flight: Sequence[Mapping[str, Any]] = (),
    problem: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The level-based part of status (everything except the recovery records), as a merge patch.

    `recovery`/`in_flight`: recoveries in flight (one record, or the per-replica list). `problem`:
    (reason, message) of something that keeps replicas from running (unschedulable, pod rejected)."""
    active = [*in_flight, *([recovery] if recovery is not None else [])]
    total = len(rows)
    ready = sum(1 for r in rows if r["state"] == "Ready")
    scheduled = sum(1 for r in rows if r["node"])
    phase = phases.next_phase(
        spec_valid=spec_valid,
        total_ranks=total,
        scheduled_ranks=scheduled,
        ready_ranks=ready,
        recovering=bool(active),
        gave_up=gave_up is not None,
        ever_served=ever_served,
    )
    all_ready = bool(total) and ready == total
    label = str(protection.get("protected", "no"))
    ready_reason, ready_message = "RanksNotReady", f"{ready}/{total} ranks ready"
    if problem is not None and not all_ready:
        ready_reason, ready_message = problem[0], f"{ready_message}: {problem[1]}"
    wanted = {
        READY: (
            ("True", "AllRanksReady", ready_message) if all_ready else ("False", ready_reason, ready_message)
        ),
        PROTECTED: (
            {"yes": "True", "unknown": "Unknown"}.get(label, "False"),
            f"Protection{label.title()}",
            "sidecar figures missing or a sidecar unreachable"
            if label == "unknown"
            else f"{protection.get('protectedChunks', 0)} chunks protected, "
            f"{protection.get('unprotectedChunks', 0)} unprotected",
        ),
        RECOVERING: (
            "True",
            str(active[0]["reason"]),
            "; ".join(
                f"replica {r.get('replica', r.get('group', 0))}: {r['kind']} fault, step {r['step']}"
                for r in active
            ),
        )
        if active
        else ("False", "NoRecovery", "no recovery in flight"),
        DEGRADED: ("True", "RecoveryBudgetExhausted", gave_up)
        if gave_up is not None
        else ("True", "RanksLost", f"{total - ready} ranks not ready")
        if phase == phases.DEGRADED
        else ("False", "Healthy", "no lasting degradation"),
    }
    out: dict[str, Any] = {
        "phase": phase,
        "readyRanks": ready,
        "totalRanks": total,
        "ready": f"{ready}/{total}",
        "ranks": [dict(r) for r in rows],
        "protection": dict(protection),
        "conditions": conditions(old_conditions, wanted, now=now, generation=generation),
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out
