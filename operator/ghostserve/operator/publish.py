"""Status of a deployment: protection figures from the sidecars, the ranks table, conditions, phase.

Protected is True only when every replica's sidecar answered, at least one chunk is protected and
no committed chunk waits without parity; Unknown when a sidecar did not answer or a replica has no
figures yet; False otherwise (docs/operator.md, "Status").
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ghostserve.operator import pods as podmodel
from ghostserve.operator import sidecars, status
from ghostserve.operator.stamps import now_iso

if TYPE_CHECKING:
    from ghostserve.operator.loopstate import LoopState as Reconciler


async def refresh_figures(loop: Reconciler, spec: Mapping[str, Any], pods: Mapping[int, Any]) -> None:
    """DescribeGroup of every replica on the sidecar of its node (None recorded when it fails)."""
    loop.figures_at = time.monotonic()
    for replica in range(int(spec["engine"]["replicas"])):
        node = ((pods.get(replica) or {}).get("spec") or {}).get("nodeName")
        if not node:
            loop.figures.pop(replica, None)
            continue
        try:
            found = await loop.rt.sidecars.describe(loop.address(node, spec), loop.group_id(replica))
        except Exception as exc:  # figures are informative; a down sidecar must not stop the loop
            loop.log.debug("describe-group-failed", extra={"node": node, "error": str(exc)})
            loop.figures[replica] = (node, None)
            continue
        # NOT_FOUND: the engine has not attached yet, the replica holds nothing (known: 0 chunks).
        loop.figures[replica] = (node, found if found is not None else sidecars.GroupFigures(0, 0, 0))


def figures_stale(loop: Reconciler, pods: Mapping[int, Any]) -> bool:
    """A replica became ready on a node its figures were not taken from: ask now, not at the resync."""
    for replica, pod in pods.items():
        node = (pod.get("spec") or {}).get("nodeName")
        if node and status.pod_ready(pod) and loop.figures.get(replica, ("", None))[0] != node:
            return True
    return False


def protection(loop: Reconciler, spec: Mapping[str, Any]) -> dict[str, Any]:
    replicas = range(int(spec["engine"]["replicas"]))
    found = [loop.figures.get(r, ("", None))[1] for r in replicas]
    known = [f for f in found if f is not None]
    return status.protection_summary(
        enabled=bool(spec["protection"]["enabled"]) and spec["protection"]["code"] != "none",
        protected_chunks=sum(f.protected_chunks for f in known),
        unprotected_chunks=sum(f.unprotected_chunks for f in known),
        parity_bytes=sum(f.parity_bytes for f in known),
        known=len(known) == len(found),
    )


def _problem(loop: Reconciler, pods: Mapping[int, Any]) -> tuple[str, str] | None:
    for replica, pod in sorted(pods.items()):
        why = status.unschedulable(pod)
        if why is not None:
            message = f"replica {replica}: {why}"
            loop.warn_once(f"unschedulable:{podmodel.uid_of(pod)}", "Unschedulable", message)
            return "Unschedulable", f"replica {replica}: {why}"
    for rec in loop.in_flight.values():
        if rec.unschedulable:
            return "ReplacementUnschedulable", f"replica {rec.replica}: {rec.unschedulable}"
    return None


async def publish(loop: Reconciler, spec: Mapping[str, Any]) -> None:
    """Patch the level-based status when it differs from what was last written."""
    pods = loop.rt.view.pods(loop.key)
    recorded = {(r["group"], r["rank"]): int(r.get("restarts", 0)) for r in loop.status.get("ranks") or []}
    tp = int(spec["engine"]["tensorParallel"])
    rows = []
    for replica in range(int(spec["engine"]["replicas"])):
        pod = pods.get(replica)
        asked, figures = loop.figures.get(replica, ("", None))
        node = ((pod or {}).get("spec") or {}).get("nodeName")
        uuids = figures.device_uuids if figures is not None and asked == node else {}
        rows += [
            status.rank_row(
                replica,
                rank,
                pod,
                name=podmodel.replica_pod_name(loop.name, replica),
                recorded_restarts=recorded.get((replica, rank), 0),
                gpu=uuids.get(rank, ""),
            )
            for rank in range(tp)
        ]
    ever_served = loop.status.get("phase") in {"Serving", "Recovering", "Degraded"}
    out = status.summary(
        spec_valid=True,
        rows=rows,
        recovery=None,
        in_flight=[
            {"replica": r.replica, "kind": r.kind, "reason": r.reason, "step": r.step}
            for r in sorted(loop.in_flight.values(), key=lambda r: r.replica)
        ],
        gave_up=loop.gave_up,
        ever_served=ever_served,
        protection=protection(loop, spec),
        old_conditions=loop.status.get("conditions") or [],
        generation=(loop.body.get("metadata") or {}).get("generation"),
        now=now_iso(),
        problem=_problem(loop, pods),
    )
    # Before this loop's first write, what is stored is what a previous operator (or pass) published:
    # a restarted operator does not rewrite a thousand unchanged statuses.
    stored = (loop.body.get("status") or {}) if loop.published is None else None
    before = loop.published if stored is None else {k: stored.get(k) for k in out}
    if out != before:
        await loop.persist(**out)
    loop.published = out
