"""In-memory view of the cluster objects the operator reacts to, fed by kopf event handlers.

Kept apart from I/O: handlers call `put_*`/`drop_*` with raw dicts, the reconciler reads. The view
also answers "which deployments must look again" after a change, so a signal wakes only those.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

from ghostserve.operator import faults, pods, specs

Key = tuple[str, str]  # (namespace, deployment name)


class ClusterView:
    def __init__(self) -> None:
        self._pods: dict[Key, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
        self._nodes: dict[str, dict[str, Any]] = {}
        self._gpu_faults: dict[str, dict[str, faults.Fault]] = collections.defaultdict(dict)
        self._deleted_nodes: set[str] = set()
        self._gateways: dict[Key, dict[str, Any]] = {}
        self._bad: dict[str, set[str]] = collections.defaultdict(set)  # node -> GPUs faulty since

    @staticmethod
    def pod_key(pod: Mapping[str, Any]) -> tuple[Key, int] | None:
        return pods.replica_of(pod)

    @staticmethod
    def gateway_key(pod: Mapping[str, Any]) -> Key | None:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(pods.COMPONENT_LABEL) != specs.GATEWAY_COMPONENT:
            return None
        if specs.DEPLOYMENT_LABEL not in labels:
            return None
        return str(meta.get("namespace")), str(labels[specs.DEPLOYMENT_LABEL])

    def gateway(self, key: Key) -> dict[str, Any] | None:
        return self._gateways.get(key)

    def put_pod(self, pod: Mapping[str, Any]) -> Key | None:
        """Record the latest state of a replica (or gateway) pod; returns its deployment key (None for
        other pods)."""
        gateway = self.gateway_key(pod)
        if gateway is not None:
            self._gateways[gateway] = dict(pod)
            return gateway
        found = self.pod_key(pod)
        if found is None:
            return None
        key, slot = found
        self._pods[key][slot] = dict(pod)
        return key

    def drop_pod(self, pod: Mapping[str, Any]) -> Key | None:
        """Forget a deleted pod, unless a newer pod (another UID) already took its slot."""
        gateway = self.gateway_key(pod)
        if gateway is not None:
            current = self._gateways.get(gateway)
            uid = (pod.get("metadata") or {}).get("uid")
            if current is not None and current["metadata"].get("uid") == uid:
                del self._gateways[gateway]
            return gateway
        found = self.pod_key(pod)
        if found is None:
            return None
        key, slot = found
        current = self._pods[key].get(slot)
        if current is not None and current["metadata"].get("uid") == (pod.get("metadata") or {}).get("uid"):
            del self._pods[key][slot]
        return key

    def pods(self, key: Key) -> dict[int, dict[str, Any]]:
        """Replica -> its pod, for one deployment."""
        return dict(self._pods.get(key, {}))

    def all_pods(self) -> list[dict[str, Any]]:
        """Every replica pod of every deployment (GPU accounting for placement)."""
        return [p for found in self._pods.values() for p in found.values()]

    def nodes(self) -> dict[str, dict[str, Any]]:
        return dict(self._nodes)

    def forget(self, key: Key) -> None:
        self._pods.pop(key, None)
        self._gateways.pop(key, None)

    def put_node(self, node: Mapping[str, Any]) -> None:
        self._nodes[node["metadata"]["name"]] = dict(node)
        self._deleted_nodes.discard(node["metadata"]["name"])

    def drop_node(self, name: str) -> None:
        self._nodes.pop(name, None)
        self._deleted_nodes.add(name)

    def node_deleted(self, name: str | None) -> bool:
        """Seen and then deleted (unknown nodes are not reported: the node watch may simply lag)."""
        return name in self._deleted_nodes

    def node(self, name: str | None) -> dict[str, Any] | None:
        return self._nodes.get(name) if name else None

    def node_ip(self, name: str) -> str:
        for addr in ((self._nodes.get(name) or {}).get("status") or {}).get("addresses") or []:
            if addr.get("type") == "InternalIP":
                return str(addr.get("address"))
        return name

    def put_gpu_fault(self, fault: faults.Fault) -> None:
        if fault.node is not None and fault.gpu is not None:
            self._gpu_faults[fault.node][fault.gpu] = fault
            self._bad[fault.node].add(fault.gpu)

    def gpu_healthy(self, node: str, gpu: str | None) -> None:
        """The sidecar reported the GPU (None: every GPU of the node) healthy again."""
        self.clear_gpu(node, gpu)
        if gpu is None:
            self._bad.pop(node, None)
        else:
            self._bad.get(node, set()).discard(gpu)

    def bad_gpus(self) -> dict[str, int]:
        """GPUs per node that had a fatal fault and were not reported healthy since (placement counts
        them out even before the device plugin lowers the node's allocatable)."""
        return {node: len(found) for node, found in self._bad.items() if found}

    def clear_gpu(self, node: str, gpu: str | None) -> None:
        """The fault was acted on: it no longer triggers a recovery (it still counts in bad_gpus)."""
        if gpu is None:
            self._gpu_faults.pop(node, None)
        else:
            self._gpu_faults.get(node, {}).pop(gpu, None)

    def gpu_faults(self, node: str | None) -> list[faults.Fault]:
        return list(self._gpu_faults.get(node, {}).values()) if node else []

    def deployments_on(self, node: str) -> set[Key]:
        return {
            key
            for key, pods in self._pods.items()
            if any((p.get("spec") or {}).get("nodeName") == node for p in pods.values())
        }

    def nodes_in_use(self) -> set[str]:
        return {
            n
            for pods in self._pods.values()
            for p in pods.values()
            if (n := (p.get("spec") or {}).get("nodeName"))
        }
