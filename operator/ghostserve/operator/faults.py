"""Classify fault signals of a replica into process | device | node (docs/operator.md, "Detection").

Pure functions over the raw dicts of pods, nodes and sidecar health events. What each kind means
for the KV cache (and so for remediation):

- process: the engine died but the node and GPUs are fine; the KV pools are in the sidecar's custody,
  nothing is lost (restart in place, 0 bytes rebuilt);
- device: ONE GPU, so one rank of one replica, can no longer be trusted; that rank's KV is lost and is
  rebuilt from survivors + parity (the node and its sidecar still work);
- node: the node is gone, drained or cordoned; the replica must run elsewhere; its KV moves with it
  while the node's sidecar answers, else it is recomputed.

A GPU signal names a GPU (UUID); it hits the rank that attached with that UUID and nothing else. A
signal that names no GPU, or a GPU no rank holds, is reported and ignored: never guessed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

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
# NVIDIA GPU UUIDs as NVML, the device plugin and node-problem detectors print them.
_GPU_UUID = re.compile(r"GPU-[0-9A-Za-z][0-9A-Za-z-]{3,63}")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One classified fault signal."""

    kind: str  # process | device | node
    reason: str  # CamelCase, used as the Event reason
    message: str
    node: str | None = None
    gpu: str | None = None  # UUID of the bad GPU when the signal names one
    gpu_index: str | None = None  # its index on the node, when known
    node_wide: bool = False  # the whole node is affected (node faults)
    group: str | None = None  # sidecar group holding `gpu` (the sidecar's attribution), when known
    rank: int | None = None  # rank of `group` attached with `gpu`


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
    """Node fault shown by a node (NotReady, cordoned), or None while it can run replicas. GPU signals
    are `node_gpu_faults`: they hit one rank, not the node. (`gpu_conditions` kept for callers.)"""
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
    return None


def node_gpu_faults(
    node: Mapping[str, Any], *, gpu_conditions: frozenset[str] = DEFAULT_GPU_CONDITIONS
) -> list[Fault]:
    """Device faults from a node's GPU taints (`nvidia.com/*` NoSchedule/NoExecute) and GPU conditions.

    One fault per GPU UUID the signal names; a signal naming none gives one fault with gpu None, which
    the caller reports and ignores (it cannot say which rank, and never hits every rank on the node)."""
    name = (node.get("metadata") or {}).get("name")
    signals: list[tuple[str, str]] = []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if str(taint.get("key", "")).startswith("nvidia.com/") and taint.get("effect") in {
            "NoSchedule",
            "NoExecute",
        }:
            signals.append(("GpuTaint", f"taint {taint['key']}={taint.get('value', '')}:{taint['effect']}"))
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") in gpu_conditions and cond.get("status") == "True":
            signals.append(("GpuCondition", f"{cond['type']}: {cond.get('message', '')}".strip()))
    out = []
    for reason, message in signals:
        uuids = sorted(set(_GPU_UUID.findall(message)))
        out += [Fault(DEVICE, reason, message, node=name, gpu=u) for u in uuids] or [
            Fault(DEVICE, reason, message, node=name)
        ]
    return out


def classify_health(event: Mapping[str, Any], *, fallback_node: str | None = None) -> Fault | None:
    """Device fault from a sidecar health event (a dict of ghostserve.v1.HealthEvent, `kind` by name).

    None when the event is not fatal."""
    reason = _FATAL_HEALTH_REASONS.get(str(event.get("kind")))
    if not event.get("fatal") or reason is None:
        return None
    index = str(event.get("gpu_index", 0))
    gpu = event.get("gpu_uuid") or None
    detail = f" {event['xid']}" if event.get("xid") else ""
    group = str(event.get("group") or "") or None
    return Fault(
        DEVICE,
        reason,
        f"GPU {gpu or 'index ' + index}: {reason}{detail} {event.get('message', '')}".strip(),
        node=event.get("node") or fallback_node,
        gpu=gpu,
        gpu_index=index,
        group=group,
        rank=int(event.get("rank") or 0) if group else None,
    )


def attribute(fault: Fault, *, group: str, uuid_ranks: Mapping[str, int]) -> int | None:
    """The rank of `group` a device fault hits, or None when it is not one of this group's GPUs.

    The sidecar's own attribution (the event's group/rank) comes first; else the GPU UUID is looked up
    in what the group's ranks attached with (`uuid_ranks`, from DescribeGroup)."""
    if fault.group is not None:
        return fault.rank if fault.group == group else None
    if fault.gpu is not None and fault.gpu in uuid_ranks:
        return uuid_ranks[fault.gpu]
    return None


def replica_faults(
    pod: Mapping[str, Any] | None,
    node: Mapping[str, Any] | None,
    gpu_faults: Iterable[Fault],
    *,
    group: str,
    uuid_ranks: Mapping[str, int],
    known_restarts: int = 0,
    gpu_conditions: frozenset[str] = DEFAULT_GPU_CONDITIONS,
    node_deleted: bool = False,
) -> list[tuple[int | None, Fault]]:
    """Every fault of one scheduled replica pod: (None, fault) for the whole replica (its pod or its
    node), (rank, fault) for a device fault of one rank. Empty while the replica is healthy.

    `gpu_faults`: the GPU faults seen on the pod's node (sidecar health stream); node GPU taints and
    conditions are added here. `node_deleted`: the pod's Node was seen and then deleted."""
    if pod is None or not (pod.get("spec") or {}).get("nodeName"):
        return []
    node_name = pod["spec"]["nodeName"]
    out: list[tuple[int | None, Fault]] = []
    whole = [classify_pod(pod, known_restarts=known_restarts)]
    if node_deleted:
        gone = f"node {node_name} was removed"
        whole.append(Fault(NODE, "NodeDeleted", gone, node=node_name, node_wide=True))
    signals = list(gpu_faults)
    if node is not None:
        whole.append(classify_node(node, gpu_conditions=gpu_conditions))
        signals += node_gpu_faults(node, gpu_conditions=gpu_conditions)
    out += [(None, f) for f in whole if f is not None]
    seen: set[int] = set()
    for fault in signals:
        rank = attribute(fault, group=group, uuid_ranks=uuid_ranks)
        if rank is not None and rank not in seen:
            seen.add(rank)
            out.append((rank, fault))
    return out
