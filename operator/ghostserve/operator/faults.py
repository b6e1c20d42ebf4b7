"""Classify fault signals of a rank into process | device | node (DESIGN §1, §4.4).

Pure functions over the raw dicts of pods, nodes and sidecar health events. What each kind means
for the KV cache (and so for remediation):

- process: the worker died but the node and GPU are fine; the KV pools are in the sidecar's custody,
  nothing is lost (restart in place, 0 bytes rebuilt);
- device: the rank's GPU can no longer be trusted; its KV is lost and is rebuilt from survivors +
  parity (the node and its sidecar still work);
- node: the node is gone or being drained; the rank must run elsewhere and its KV is recomputed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ghostserve.operator import specs

PROCESS, DEVICE, NODE = "process", "device", "node"
_SEVERITY = {PROCESS: 1, DEVICE: 2, NODE: 3}

# Node condition types that mean "a GPU on this node is broken" (NVSentinel, node-problem-detector's
# GPU plugins). Deployments may configure their own set (`--gpu-condition`).
DEFAULT_GPU_CONDITIONS = frozenset(
    {
        "GpuXidError",
        "GpuDbeError",
        "GpuFallenOffBus",
        "GpuHealthy-False",
        "NVSentinelGpuFault",
        "GpuMemoryError",
        "GpuNvlinkError",
        "XidCriticalError",
    }
)
# HealthKind names (ghostserve.v1) that can mean a lost GPU, with their Event reasons.
_FATAL_HEALTH_REASONS = {"XID": "Xid", "ECC_DOUBLE_BIT": "EccDoubleBit", "GPU_LOST": "GpuLost"}


@dataclasses.dataclass(frozen=True)
class Fault:
    """One classified fault signal."""

    kind: str  # process | device | node
    reason: str  # CamelCase, used as the Event reason
    message: str
    node: str | None = None
    gpu: str | None = None  # UUID (else index) of the bad GPU when the signal names one
    gpu_index: str | None = None  # its index on the node, when known
    node_wide: bool = False  # every rank on `node` is affected


def worst(faults: Iterable[Fault | None]) -> Fault | None:
    """The most severe fault (node > device > process), the first one on ties; None when none."""
    found = [f for f in faults if f is not None]
    return max(found, key=lambda f: _SEVERITY[f.kind]) if found else None


def classify_pod(pod: Mapping[str, Any], *, known_restarts: int = 0) -> Fault | None:
    """Fault shown by a rank pod's own status, or None while it is healthy (or still starting).

    `known_restarts` is the container restart count last recorded in the deployment's status:
    a higher count means kubelet restarted the engine in place."""
    status = pod.get("status") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    if status.get("reason") == "Evicted":
        return Fault(NODE, "Evicted", status.get("message") or "pod evicted", node=node)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return Fault(
                NODE,
                "DisruptionTarget",
                f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(),
                node=node,
            )
    restarts = 0
    for cs in status.get("containerStatuses") or []:
        restarts += int(cs.get("restartCount") or 0)
        term = (cs.get("state") or {}).get("terminated")
        if term is not None:
            reason = term.get("reason") or "Error"
            return Fault(
                PROCESS,
                "OOMKilled" if reason == "OOMKilled" else "ContainerTerminated",
                f"container {cs.get('name')} exited with code {term.get('exitCode')} ({reason})",
                node=node,
            )
    if status.get("phase") == "Failed":
        return Fault(PROCESS, "PodFailed", status.get("message") or "pod phase Failed", node=node)
    if restarts > known_restarts:
        return Fault(
            PROCESS, "ContainerRestarted", f"restart count {known_restarts} -> {restarts}", node=node
        )
    return None


def classify_node(
    node: Mapping[str, Any], *, gpu_conditions: frozenset[str] = DEFAULT_GPU_CONDITIONS
) -> Fault | None:
    """Fault shown by a node, or None while it can run ranks."""
    name = (node.get("metadata") or {}).get("name")
    status, spec = node.get("status") or {}, node.get("spec") or {}
    conditions = status.get("conditions") or []
    for cond in conditions:
        if cond.get("type") == "Ready" and cond.get("status") != "True":
            return Fault(
                NODE,
                "NodeNotReady",
                cond.get("message") or f"Ready={cond.get('status')}",
                node=name,
                node_wide=True,
            )
    if spec.get("unschedulable"):
        return Fault(NODE, "NodeCordoned", "node is cordoned (unschedulable)", node=name, node_wide=True)
    for taint in spec.get("taints") or []:
        if str(taint.get("key", "")).startswith("nvidia.com/") and taint.get("effect") in {
            "NoSchedule",
            "NoExecute",
        }:
            return Fault(
                DEVICE,
                "GpuTaint",
                f"taint {taint['key']}={taint.get('value', '')}:{taint['effect']}",
                node=name,
                node_wide=True,
            )
    for cond in conditions:
        if cond.get("type") in gpu_conditions and cond.get("status") == "True":
            return Fault(
                DEVICE,
                "GpuCondition",
                f"{cond['type']}: {cond.get('message', '')}".strip(),
                node=name,
                node_wide=True,
            )
    capacity = (status.get("capacity") or {}).get("nvidia.com/gpu")
    allocatable = (status.get("allocatable") or {}).get("nvidia.com/gpu")
    if capacity is not None and allocatable is not None and int(allocatable) < int(capacity):
        return Fault(
            DEVICE,
            "GpuAllocatableDropped",
            f"allocatable nvidia.com/gpu {allocatable} < {capacity}",
            node=name,
            node_wide=True,
        )
    return None


def classify_health(event: Mapping[str, Any], *, fallback_node: str | None = None) -> Fault | None:
    """Device fault from a sidecar health event (a dict of ghostserve.v1.HealthEvent, `kind` by name).

    None when the event is not fatal."""
    reason = _FATAL_HEALTH_REASONS.get(str(event.get("kind")))
    if not event.get("fatal") or reason is None:
        return None
    index = str(event.get("gpu_index", 0))
    gpu = event.get("gpu_uuid") or index
    detail = f" {event['xid']}" if event.get("xid") else ""
    return Fault(
        DEVICE,
        reason,
        f"GPU {gpu}: {reason}{detail} {event.get('message', '')}".strip(),
        node=event.get("node") or fallback_node,
        gpu=gpu,
        gpu_index=index,
    )


def pod_gpus(pod: Mapping[str, Any]) -> set[str]:
    """GPUs a rank pod runs on, from the annotation the engine writes (empty when unknown)."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(specs.GPU_ANNOTATION, "")
    return {g.strip() for g in raw.split(",") if g.strip()}


def rank_fault(
    pod: Mapping[str, Any] | None,
    node: Mapping[str, Any] | None,
    gpu_faults: Iterable[Fault],
    *,
    known_restarts: int = 0,
    gpu_conditions: frozenset[str] = DEFAULT_GPU_CONDITIONS,
    node_deleted: bool = False,
) -> Fault | None:
    """The worst fault of one scheduled rank from every signal: its pod, its node, its node's GPU events.

    A GPU event hits the rank when it names one of the rank's GPUs, or when the rank's GPUs are
    unknown (no annotation): then the conservative answer is that it may be this rank.
    `node_deleted`: the rank's Node object was seen and then deleted (node removed from the cluster)."""
    if pod is None or not (pod.get("spec") or {}).get("nodeName"):
        return None
    gpus = pod_gpus(pod)
    node_name = pod["spec"]["nodeName"]
    candidates: list[Fault | None] = [classify_pod(pod, known_restarts=known_restarts)]
    if node_deleted:
        candidates.append(
            Fault(NODE, "NodeDeleted", f"node {node_name} was removed", node=node_name, node_wide=True)
        )
    if node is not None:
        candidates.append(classify_node(node, gpu_conditions=gpu_conditions))
    for fault in gpu_faults:
        if fault.gpu is None or not gpus or fault.gpu in gpus or fault.gpu_index in gpus:
            candidates.append(fault)
    return worst(candidates)
