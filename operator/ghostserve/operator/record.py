"""The recovery record of one replica and its step machine (pure).

A record lives in the deployment's `status.inFlight` list, one per replica in recovery. It is a
typed dataclass serialised to a dict that never holds a null: the status is written with a JSON
merge patch, where a null DELETES a key (the bug that made a restarted operator raise KeyError
forever), and the list as a whole is replaced by every patch, so no stale key survives either.

Steps run in order; each is written before the next starts and each is idempotent, so an operator
killed anywhere resumes at the recorded step and repeats at most the step it was in:

  Detected -> MarkedLost (device, source alive) -> PodDeleted -> Rebuilt (device, protected)
  -> Placed -> KVReady (move to the new node, or reset) -> PodCreated -> Running
  -> Released (the source's copy after a move) -> Done
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

DETECTED = "Detected"
MARKED_LOST = "MarkedLost"  # the source sidecar wiped and invalidated the lost ranks' pools
POD_DELETED = "PodDeleted"
REBUILT = "Rebuilt"  # PlanRecovery + Rebuild of the lost ranks on the source sidecar
PLACED = "Placed"  # target node chosen (same node, or another one with TP healthy free GPUs)
KV_READY = "KVReady"  # KV on the target: moved there (MoveGroup), reset (DeleteGroup) or already there
POD_CREATED = "PodCreated"
RUNNING = "Running"
RELEASED = "Released"  # DeleteGroup on the source after a move, and on stale copies
DONE = "Done"
REPLAN = "Replan"  # the pinned replacement could not be scheduled: choose another node
STEPS = (DETECTED, MARKED_LOST, POD_DELETED, REBUILT, PLACED, KV_READY, POD_CREATED, RUNNING, RELEASED, DONE)

# Actions (remediation.decide).
RESTART_IN_PLACE = "RestartInPlace"
RESCHEDULE = "Reschedule"
RECORD_ONLY = "RecordOnly"

# What happened to the replica's KV.
KV_PRESERVED, KV_REBUILT, KV_MOVED, KV_RECOMPUTED = "Preserved", "Rebuilt", "Moved", "Recomputed"
SUCCEEDED, DEGRADED, FAILED = "Succeeded", "Degraded", "Failed"


@dataclasses.dataclass
class RankFault:
    rank: int  # -1: the whole replica (pod or node signal)
    kind: str
    reason: str
    gpu: str = ""


@dataclasses.dataclass
class Recovery:
    id: str
    replica: int
    kind: str  # the worst kind among `faults`
    reason: str
    message: str
    action: str
    detected_at: str
    faults: list[RankFault] = dataclasses.field(default_factory=list)
    lost_ranks: list[int] = dataclasses.field(default_factory=list)  # device-faulted ranks only
    old_uid: str = ""
    source: str = ""  # node whose sidecar holds the replica's KV
    source_alive: bool = True  # False: node gone, its KV with it (recompute)
    protected: bool = False
    reset: bool = False  # faultPolicy group: the sidecar group is deleted, the KV recomputed
    expected_chunks: int = 0  # protected chunks the source held at detection (what a rebuild must bring back)
    group_found: bool = False  # the source sidecar held the group at detection (a move must move bytes)
    # The source sidecar's rebuilt-into-this-group figures at detection: what it rebuilt since then, by
    # any caller, is this recovery's (a Rebuild repeated after a restart may find nothing left to do).
    rebuilt_baseline_bytes: int = 0
    rebuilt_baseline_chunks: int = 0
    target: str = ""
    avoid: list[str] = dataclasses.field(default_factory=list)
    stale_copies: list[str] = dataclasses.field(default_factory=list)
    step: str = DETECTED
    attempts: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    bytes_rebuilt: int = 0
    chunks_rebuilt: int = 0
    chunks_recomputed: int = 0
    bytes_moved: int = 0
    unschedulable: str = ""
    replaced_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """camelCase dict without a single None (a merge patch would delete such keys)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "faults":
                value = [dataclasses.asdict(x) for x in value]
            elif isinstance(value, list):
                value = list(value)
            out[_camel(f.name)] = value
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Recovery:
        """Inverse of to_dict; missing keys take their defaults (records written by older operators)."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = _camel(f.name)
            if key not in raw or raw[key] is None:
                continue
            value = raw[key]
            if f.name == "faults":
                value = [RankFault(**{k: v for k, v in x.items() if k in _RANK_FAULT_FIELDS}) for x in value]
            kwargs[f.name] = value
        return cls(**kwargs)

    def note(self, text: str) -> None:
        self.notes = [*self.notes[-9:], text[:300]]


_RANK_FAULT_FIELDS = {f.name for f in dataclasses.fields(RankFault)}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def moves(rec: Recovery) -> bool:
    """The KV has to go from the source's sidecar to the target's."""
    return bool(rec.target) and rec.target != rec.source and rec.source_alive and not rec.reset


def next_step(rec: Recovery) -> str:
    """The step to run after the one `rec` has reached (DONE stays DONE)."""
    if rec.step == DONE:
        return DONE
    if rec.step == REPLAN:
        return PLACED
    if rec.action == RECORD_ONLY:
        return DONE
    following = STEPS[STEPS.index(rec.step) + 1]
    if following == MARKED_LOST and not (rec.lost_ranks and rec.source_alive and not rec.reset):
        following = POD_DELETED
    if following == REBUILT and not (rec.lost_ranks and rec.protected and rec.source_alive and not rec.reset):
        following = PLACED
    if following == RELEASED and not (moves(rec) or rec.stale_copies):
        following = DONE
    return following


def kv_outcome(rec: Recovery) -> str:
    """What happened to the replica's KV, from what the recovery actually did.

    `Rebuilt` and `Moved` need bytes: a rebuild that restored nothing (no protected chunk held when the
    fault hit, all of it recomputed) or a move that moved nothing left the KV to be recomputed, and the
    status says so (lastRecovery.kv: Recomputed)."""
    if rec.reset or not rec.source_alive:
        return KV_RECOMPUTED
    if moves(rec):
        return KV_MOVED if rec.bytes_moved > 0 else KV_RECOMPUTED
    if rec.lost_ranks:
        return KV_REBUILT if rec.protected and rec.bytes_rebuilt > 0 else KV_RECOMPUTED
    return KV_PRESERVED


def outcome(rec: Recovery, *, failed: str | None = None) -> tuple[str, str, str]:
    """(outcome, kv, message) of a finished recovery.

    A recovery that expected bytes back (protected chunks of lost ranks; a group to move) and got
    none is Degraded, never Succeeded; `kv` is never Rebuilt or Moved without bytes (kv_outcome)."""
    kv = kv_outcome(rec)
    if failed:
        return FAILED, kv, failed
    rebuilds = rec.lost_ranks and rec.protected and rec.source_alive and not rec.reset
    if rebuilds and rec.expected_chunks > 0 and rec.chunks_rebuilt == 0:
        why = "; ".join(rec.notes[-2:]) or "the sidecar rebuilt nothing"
        return DEGRADED, kv, f"expected {rec.expected_chunks} protected chunks back, rebuilt none: {why}"
    if moves(rec) and rec.group_found and rec.bytes_moved == 0:
        why = "; ".join(rec.notes[-2:]) or "MoveGroup moved nothing"
        return DEGRADED, kv, f"the KV had to move {rec.source} -> {rec.target}, moved none: {why}"
    if kv == KV_RECOMPUTED:
        return SUCCEEDED, kv, f"KV recomputed: {_recompute_reason(rec)}"
    return SUCCEEDED, kv, {
        KV_PRESERVED: "KV kept in the sidecar's custody",
        KV_REBUILT: f"ranks {rec.lost_ranks} rebuilt on {rec.source}",
        KV_MOVED: f"KV moved {rec.source} -> {rec.target}",
    }.get(kv, "")


def _recompute_reason(rec: Recovery) -> str:
    if rec.reset:
        return "faultPolicy group reset the sidecar group"
    if not rec.source_alive:
        return f"node {rec.source} was lost"
    if moves(rec):
        return f"the sidecar of {rec.source} held no KV of the replica to move"
    if not rec.protected:
        return f"ranks {rec.lost_ranks} lost, the replica is not protected"
    why = f"the sidecar of {rec.source} held no protected chunk of ranks {rec.lost_ranks} to rebuild"
    return why + (f" ({rec.chunks_recomputed} chunks recomputed)" if rec.chunks_recomputed else "")


def chunks_recomputed(
    plan: Mapping[str, tuple[int, Iterable[int]]], failed: Mapping[str, Iterable[int]]
) -> int:
    """Chunks a PlanRecovery + Rebuild leaves to the engine: per request the first r chunks the plan
    recomputes, plus every chunk past r that the plan found unprotected or the Rebuild could not
    rebuild, each counted once (a Rebuild asked for every chunk past r fails the unprotected ones
    again: they are the same chunks, not more of them).

    plan: request id -> (r, unprotected chunk indexes); failed: request id -> failed chunk indexes."""
    total = 0
    for rid in plan.keys() | failed.keys():
        r, unprotected = plan.get(rid, (0, ()))
        total += r + len({c for c in unprotected if c >= r} | {c for c in failed.get(rid, ()) if c >= r})
    return total


def in_flight(raw: Any) -> dict[int, Recovery]:
    """Records of status.inFlight by replica (malformed entries are dropped, not fatal)."""
    out: dict[int, Recovery] = {}
    for item in raw or []:
        try:
            rec = Recovery.from_dict(item)
        except (TypeError, ValueError):
            continue
        out[rec.replica] = rec
    return out
