"""Where a replacement replica pod goes (pure): same node when it still has TP healthy free GPUs,
else the best other node that can take the whole replica, else nowhere (reported, never split).

The operator decides the node itself (and pins the pod there) because the KV has to be on that
node's sidecar before the engine attaches: moved there first when it is another node. The scheduler
still has the last word; a pinned pod it cannot place is reported as unschedulable and re-planned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ghostserve.operator import pods


@dataclasses.dataclass(frozen=True)
class Placement:
    node: str | None  # None: no node can take the replica now
    same_node: bool
    reason: str  # why this node (or why none)


def _terminal(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in {"Succeeded", "Failed"}


def gpus_in_use(all_pods: Iterable[Mapping[str, Any]], *, ignore_uids: Iterable[str] = ()) -> dict[str, int]:
    """GPUs held per node by the pods the operator sees (bound, not finished), minus `ignore_uids`
    (the failed pod being replaced: its GPUs are freed by its deletion)."""
    skip = set(ignore_uids)
    used: dict[str, int] = {}
    for pod in all_pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or _terminal(pod) or (pod.get("metadata") or {}).get("uid") in skip:
            continue
        used[node] = used.get(node, 0) + pods.gpu_request(pod)
    return used


def healthy_gpus(node: Mapping[str, Any], *, known_bad: int = 0) -> int:
    """GPUs the node can still hand out: allocatable (the device plugin drops unhealthy ones), and at
    most capacity minus the GPUs the operator already knows are bad (the plugin may lag)."""
    status = node.get("status") or {}

    def count(where: str) -> int:
        try:
            return int(str((status.get(where) or {}).get(pods.GPU_RESOURCE, "0")))
        except ValueError:
            return 0

    return max(0, min(count("allocatable"), count("capacity") - known_bad))


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol.get("effect") != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists" and (not tol.get("key") or tol.get("key") == taint.get("key")):
            return True
        if tol.get("key") == taint.get("key") and str(tol.get("value", "")) == str(taint.get("value", "")):
            return True
    return False


def can_run(node: Mapping[str, Any], spec: Mapping[str, Any]) -> str | None:
    """None when the node may take a replica of `spec`, else why not."""
    name = (node.get("metadata") or {}).get("name")
    n_spec, status = node.get("spec") or {}, node.get("status") or {}
    conditions = status.get("conditions") or []
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return f"{name} is not Ready"
    if n_spec.get("unschedulable"):
        return f"{name} is cordoned"
    engine = spec["engine"]
    tolerations = engine.get("tolerations") or []
    for taint in n_spec.get("taints") or []:
        if taint.get("effect") in {"NoSchedule", "NoExecute"} and not _tolerated(taint, tolerations):
            return f"{name} has taint {taint.get('key')}:{taint.get('effect')}"
    labels = (node.get("metadata") or {}).get("labels") or {}
    for key, value in (engine.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return f"{name} lacks label {key}={value}"
    return None


def choose(
    nodes: Mapping[str, Mapping[str, Any]],
    used: Mapping[str, int],
    spec: Mapping[str, Any],
    *,
    source: str | None,
    avoid: Iterable[str] = (),
    bad_gpus: Mapping[str, int] | None = None,
) -> Placement:
    """The node for a replacement needing `tensorParallel` GPUs.

    `source` (the node holding the replica's KV) wins when it can still run it: nothing has to move.
    Otherwise the node with the most healthy free GPUs (the scheduler's own least-allocated rule; it
    leaves room on nodes that may still need it for their own swaps), by name on ties. `bad_gpus`:
    GPUs per node known bad that allocatable may not show yet."""
    need = int(spec["engine"]["tensorParallel"])
    skip, bad = set(avoid), bad_gpus or {}

    def free(name: str) -> int:
        return healthy_gpus(nodes[name], known_bad=bad.get(name, 0)) - used.get(name, 0)

    why: list[str] = []
    if source and source in nodes and source not in skip:
        blocked = can_run(nodes[source], spec)
        if blocked is None and free(source) >= need:
            return Placement(source, True, f"{source} still has {free(source)} healthy free GPUs")
        why.append(blocked or f"{source} has {free(source)} healthy free GPUs")
    fits = []
    for name in sorted(nodes):
        if name == source or name in skip:
            continue
        blocked = can_run(nodes[name], spec)
        if blocked is None and free(name) >= need:
            fits.append((-free(name), name))
        elif blocked is not None:
            why.append(blocked)
    if fits:
        _, best = min(fits)  # most free first, then by name
        return Placement(best, False, f"{best} has {free(best)} healthy free GPUs")
    detail = "; ".join(why[:4])
    return Placement(
        None,
        False,
        f"no node has {need} healthy free GPUs for the replica (a replica never spans nodes)"
        + (f": {detail}" if detail else ""),
    )
