"""Pod placement, as kube-scheduler decides it for the pods GhostServe runs (pure, no I/O).

Filters: node Ready, not cordoned, taints tolerated, nodeSelector, required node affinity
(matchExpressions In/NotIn/Exists/DoesNotExist/Gt/Lt, matchFields on metadata.name), and enough
`nvidia.com/gpu`: allocatable (the device plugin's healthy GPUs) minus what the pods already bound to
the node request. Score: preferred node-affinity weights, then the least allocated node, then name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

GPU = "nvidia.com/gpu"
_TERMINAL = frozenset({"Failed", "Succeeded"})


def gpu_request(pod: Mapping[str, Any]) -> int:
    """`nvidia.com/gpu` the pod asks for (limits, else requests, summed over its containers)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU, (res.get("requests") or {}).get(GPU, 0))
        total += int(value)
    return total


def is_ready(node: Mapping[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists":
            if not t.get("key") or t["key"] == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _expression_ok(expr: Mapping[str, Any], values: Mapping[str, str]) -> bool:
    key, op = expr.get("key", ""), expr.get("operator")
    wanted = [str(v) for v in expr.get("values") or []]
    present = key in values
    if op == "In":
        return present and values[key] in wanted
    if op == "NotIn":
        return not present or values[key] not in wanted
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in {"Gt", "Lt"} and present and wanted:
        try:
            have, limit = int(values[key]), int(wanted[0])
        except ValueError:
            return False
        return have > limit if op == "Gt" else have < limit
    return False


def term_matches(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """One nodeSelectorTerm: every matchExpression on labels and every matchField must hold."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    fields = {"metadata.name": (node.get("metadata") or {}).get("name", "")}
    return all(_expression_ok(e, labels) for e in term.get("matchExpressions") or []) and all(
        _expression_ok(e, fields) for e in term.get("matchFields") or []
    )


def _node_affinity(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}


def why_not(pod: Mapping[str, Any], node: Mapping[str, Any], free_gpus: int) -> str | None:
    """Why `pod` cannot go to `node` (kube-scheduler's wording where it has one), or None if it fits."""
    spec, nspec = pod.get("spec") or {}, node.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    tolerations = spec.get("tolerations") or []
    if not is_ready(node):
        return "node(s) were not ready"
    if nspec.get("unschedulable") and not tolerates(
        tolerations, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    ):
        return "node(s) were unschedulable"
    for taint in nspec.get("taints") or []:
        if taint.get("effect") in {"NoSchedule", "NoExecute"} and not tolerates(tolerations, taint):
            return f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"
    selector = spec.get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return "node(s) didn't match Pod's node affinity/selector"
    required = _node_affinity(pod).get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or []
    if terms and not any(term_matches(t, node) for t in terms):
        return "node(s) didn't match Pod's node affinity/selector"
    if gpu_request(pod) > free_gpus:
        return f"Insufficient {GPU}"
    return None


def preference(pod: Mapping[str, Any], node: Mapping[str, Any]) -> int:
    """Sum of the weights of the preferred node-affinity terms the node matches."""
    prefs = _node_affinity(pod).get("preferredDuringSchedulingIgnoredDuringExecution") or []
    return sum(int(p.get("weight", 0)) for p in prefs if term_matches(p.get("preference") or {}, node))


def free_gpus(node: Mapping[str, Any], bound: Iterable[Mapping[str, Any]]) -> int:
    """Allocatable GPUs of `node` minus what its live pods (every pod bound to it) request."""
    allocatable = int(((node.get("status") or {}).get("allocatable") or {}).get(GPU, 0))
    used = sum(gpu_request(p) for p in bound if (p.get("status") or {}).get("phase") not in _TERMINAL)
    return allocatable - used


@dataclasses.dataclass(frozen=True)
class Placement:
    node: str | None  # None: unschedulable now
    message: str  # kube-scheduler's FailedScheduling message when node is None


def place(
    pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
) -> Placement:
    """Choose a node for a pending `pod` among `nodes`, given every pod already bound (`pods`)."""
    by_node: dict[str, list[Mapping[str, Any]]] = {}
    for p in pods:
        bound = (p.get("spec") or {}).get("nodeName")
        if bound:
            by_node.setdefault(bound, []).append(p)
    options: list[tuple[int, int, str]] = []
    reasons: dict[str, int] = {}
    for node in nodes:
        name = node["metadata"]["name"]
        free = free_gpus(node, by_node.get(name, []))
        reason = why_not(pod, node, free)
        if reason is None:
            options.append((-preference(pod, node), -free, name))
        else:
            reasons[reason] = reasons.get(reason, 0) + 1
    if options:
        return Placement(min(options)[2], "")
    detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    return Placement(None, f"0/{len(nodes)} nodes are available: {detail}.")
