"""Placement rules of the scheduler stand-in (pure)."""

from __future__ import annotations

from typing import Any

from ghostserve.cluster import scheduling


def node(
    name: str, *, gpus: int = 4, ready: bool = True, labels: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": spec,
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "Unknown"}],
        },
    }


def pod(
    gpus: int = 1, *, node_name: str | None = None, phase: str = "Running", **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        **spec,
    }
    if node_name:
        body["nodeName"] = node_name
    return {
        "metadata": {"name": "p", "uid": f"u-{node_name}-{gpus}"},
        "spec": body,
        "status": {"phase": phase},
    }


def test_least_allocated_node_wins_ties_by_name() -> None:
    nodes = [node("a"), node("b")]
    assert scheduling.place(pod(2), nodes, []).node == "a"
    assert scheduling.place(pod(2), nodes, [pod(2, node_name="a")]).node == "b"


def test_gpu_capacity_counts_bound_pods_but_not_finished_ones() -> None:
    nodes = [node("a", gpus=4)]
    assert scheduling.place(pod(2), nodes, [pod(3, node_name="a")]).node is None
    assert scheduling.place(pod(2), nodes, [pod(3, node_name="a", phase="Failed")]).node == "a"


def test_unhealthy_gpus_lower_allocatable_and_block_a_full_replica() -> None:
    placed = scheduling.place(pod(4), [node("a", gpus=3)], [])
    assert placed.node is None
    assert placed.message == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."


def test_not_ready_cordoned_and_tainted_nodes_are_skipped() -> None:
    nodes = [
        node("a", ready=False),
        node("b", unschedulable=True),
        node("c", taints=[{"key": "nvidia.com/gpu", "value": "bad", "effect": "NoSchedule"}]),
        node("d", taints=[{"key": "x", "effect": "PreferNoSchedule"}]),
    ]
    assert scheduling.place(pod(), nodes, []).node == "d"
    msg = scheduling.place(pod(), nodes[:3], []).message
    assert "1 node(s) were not ready" in msg and "1 node(s) were unschedulable" in msg
    assert "untolerated taint {nvidia.com/gpu: bad}" in msg


def test_tolerations_match_key_value_and_effect() -> None:
    taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    assert scheduling.tolerates([{"key": "nvidia.com/gpu", "operator": "Exists"}], taint)
    assert scheduling.tolerates([{"operator": "Exists"}], taint)
    assert scheduling.tolerates([{"key": "nvidia.com/gpu", "value": "present"}], taint)
    assert not scheduling.tolerates([{"key": "nvidia.com/gpu", "value": "other"}], taint)
    assert not scheduling.tolerates(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}], taint
    )


def test_node_selector_and_required_affinity() -> None:
    nodes = [node("a", labels={"gpu": "h100"}), node("b", labels={"gpu": "h200", "rack": "7"})]
    assert scheduling.place(pod(nodeSelector={"gpu": "h200"}), nodes, []).node == "b"
    avoid = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["a"]}]}
    ]}}}  # fmt: skip
    assert scheduling.place(pod(affinity=avoid), nodes, []).node == "b"
    gt = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "rack", "operator": "Gt", "values": ["3"]}]},
    ]}}}  # fmt: skip
    assert scheduling.place(pod(affinity=gt), nodes, []).node == "b"
    fields = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["zzz"]}]},
    ]}}}  # fmt: skip
    assert scheduling.place(pod(affinity=fields), nodes, []).node is None


def test_preferred_affinity_beats_least_allocated() -> None:
    nodes = [node("a"), node("b")]
    prefer = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "preference": {"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["a"]}]}}
    ]}}  # fmt: skip
    assert scheduling.place(pod(1, affinity=prefer), nodes, [pod(2, node_name="a")]).node == "a"


def test_gpu_request_reads_limits_then_requests() -> None:
    p = {"spec": {"containers": [{"resources": {"requests": {"nvidia.com/gpu": "2"}}}, {"resources": {}}]}}
    assert scheduling.gpu_request(p) == 2
