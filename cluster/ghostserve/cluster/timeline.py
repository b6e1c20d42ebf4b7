"""A recovery's timeline from what the API server saw (pure): the operator's status steps and Events,
the kubelet's Events and pod readiness, and the client's tokens, relative to the fault injection."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ghostserve.cluster import scenarios, traffic


@dataclasses.dataclass(frozen=True)
class Row:
    seconds: float  # after the fault was injected
    what: str
    source: str  # "client", "status", "Event <reason>", "pod"


def _ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def rows(outcome: scenarios.Outcome, name: str) -> list[Row]:
    """Every step of the recovery of deployment `name`, in time order."""
    t0 = outcome.fault_at
    if t0 is None:
        return []
    out = [Row(0.0, "fault injected", "injector")]
    before = [s.last_before(t0) for s in outcome.streams]
    if any(b is not None for b in before):
        out.append(Row(max(b for b in before if b is not None) - t0, "last token before the fault", "client"))
    steps_seen: set[str] = set()
    ready_seen: set[str] = set()
    created: set[str] = set()  # replacement pods: created after the fault
    for w in outcome.writes:
        dt = w.at - t0
        meta = w.obj.get("metadata") or {}
        if w.plural == "ghostservedeployments" and meta.get("name") == name:
            for rec in (w.obj.get("status") or {}).get("inFlight") or []:
                step = str(rec.get("step", ""))
                if step and step not in steps_seen:
                    steps_seen.add(step)
                    out.append(Row(dt, f"status step {step}", "status"))
        elif w.plural == "events":
            involved = w.obj.get("involvedObject") or {}
            mine = involved.get("name") == name or str(involved.get("name", "")).startswith(f"{name}-r")
            if mine and w.action == "create":
                out.append(Row(dt, f"{w.obj.get('message', '')}", f"Event {w.obj.get('reason')}"))
        elif w.plural == "pods" and str(meta.get("name", "")).startswith(f"{name}-r"):
            uid = str(meta.get("uid"))
            if dt > 0 and w.action == "create":
                created.add(uid)
            elif uid in created and uid not in ready_seen and _ready(w.obj):
                ready_seen.add(uid)
                out.append(Row(dt, f"replacement pod Ready on {w.obj['spec'].get('nodeName')}", "pod"))
    outages = [o for o in (s.outage(t0) for s in outcome.streams) if o is not None]
    if outages:
        out.append(Row(max(o[0] for o in outages) - t0, "last token from the failed engine", "client"))
        out.append(Row(min(o[1] for o in outages) - t0, "first token after the outage (resumed)", "client"))
    ends = [s.times[-1] for s in outcome.streams if s.times]
    if ends:
        out.append(Row(max(ends) - t0, "every request finished", "client"))
    return sorted(out, key=lambda r: r.seconds)


def first_token_after(streams: Sequence[traffic.Stream], t0: float) -> float | None:
    """Seconds from the fault to the first token after the outage (None when a stream saw none)."""
    outages = [s.outage(t0) for s in streams]
    if not outages or any(o is None for o in outages):
        return None
    return min(o[1] for o in outages if o is not None) - t0


PHASES = ("detection", "scheduling", "engine_start", "kv_restore", "resume")


def phases(outcome: scenarios.Outcome, name: str) -> dict[str, float]:
    """Seconds of each recovery phase, from the fault to the first token after the outage:

    detection (fault -> the operator recorded Detected), kv_restore (Detected -> KVReady: MarkLost,
    rebuild from parity, the move when there is one), scheduling (KVReady -> the replacement was bound,
    `Scheduled` Event), engine_start (bound -> the replacement pod Ready), resume (Ready -> the first
    token after the outage). Raises LookupError when a step is missing from the record."""
    t0 = outcome.fault_at
    if t0 is None:
        raise LookupError("no fault in this outcome")
    marks: dict[str, float] = {}
    created: set[str] = set()
    for w in outcome.writes:
        if w.at < t0:
            continue
        meta = w.obj.get("metadata") or {}
        if w.plural == "ghostservedeployments" and meta.get("name") == name:
            for rec in (w.obj.get("status") or {}).get("inFlight") or []:
                marks.setdefault(f"step:{rec.get('step')}", w.at)
        elif w.plural == "events" and w.action == "create" and w.obj.get("reason") == "Scheduled":
            if str((w.obj.get("involvedObject") or {}).get("name", "")).startswith(f"{name}-r"):
                marks.setdefault("scheduled", w.at)
        elif w.plural == "pods" and str(meta.get("name", "")).startswith(f"{name}-r"):
            if w.action == "create":
                created.add(str(meta.get("uid")))
            elif str(meta.get("uid")) in created and _ready(w.obj):
                marks.setdefault("ready", w.at)
    first = first_token_after(outcome.streams, t0)
    need = ("step:Detected", "step:KVReady", "scheduled", "ready")
    missing = [m for m in need if m not in marks]
    if missing or first is None:
        raise LookupError(f"recovery of {name} is missing {missing or ['the first token after the outage']}")
    return {
        "detection": marks["step:Detected"] - t0,
        "kv_restore": marks["step:KVReady"] - marks["step:Detected"],
        "scheduling": marks["scheduled"] - marks["step:KVReady"],
        "engine_start": marks["ready"] - marks["scheduled"],
        "resume": t0 + first - marks["ready"],
        "total": first,
    }
