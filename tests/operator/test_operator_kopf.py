"""A real `ghostserve operator` (kopf) process against the kmock API emulator, with a scheduler /
kubelet / device plugin stand-in and one recording sidecar stand-in per node (harness.py)."""

from __future__ import annotations

import pathlib
import urllib.request
from typing import Any

from tests.operator import harness, opsec_support

NS, NAME = "test", "llama"


def deployment(*, tp: int = 2, replicas: int = 1, **recovery: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ghostserve.io/v1alpha1",
        "kind": "GhostServeDeployment",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "engine": {"image": "lmsysorg/sglang:v0.5.3", "tensorParallel": tp, "replicas": replicas},
            "protection": {"code": "xor", "parityShards": 1},
            "recovery": {"backoffSeconds": 0, **recovery},
        },
    }


def gsd(cluster: harness.Cluster) -> dict[str, Any]:
    found = cluster.get(harness.GSD, NS, NAME)
    assert found is not None
    return found


def pod(cluster: harness.Cluster, replica: int) -> dict[str, Any] | None:
    return cluster.get(harness.PODS, NS, f"{NAME}-r{replica}")


def serving(cluster: harness.Cluster, ranks: int = 2) -> bool:
    status = (cluster.get(harness.GSD, NS, NAME) or {}).get("status") or {}
    return status.get("phase") == "Serving" and status.get("ready") == f"{ranks}/{ranks}"


def recovered(cluster: harness.Cluster, count: int, ranks: int = 2) -> bool:
    status = gsd(cluster).get("status") or {}
    return status.get("recoveries") == count and not status.get("inFlight") and serving(cluster, ranks)


def protected(cluster: harness.Cluster) -> str | None:
    conditions = (gsd(cluster).get("status") or {}).get("conditions") or []
    return next((c["status"] for c in conditions if c["type"] == "Protected"), None)


def reasons(cluster: harness.Cluster) -> list[str]:
    return [str(e.get("reason")) for e in cluster.list(harness.EVENTS, NS)]


def crash(cluster: harness.Cluster, replica: int, *, code: int = 137, reason: str = "OOMKilled") -> None:
    opsec_support.crash(cluster, f"{NAME}-r{replica}", code=code, reason=reason)


def test_pod_model_process_fault_gpu_swap_and_delete(
    cluster: harness.Cluster, operator: harness.OperatorProcess
) -> None:
    cluster.write("create", harness.GSD, NS, None, deployment(replicas=2))
    cluster.wait_for(
        lambda: serving(cluster, 4) and protected(cluster) == "True", timeout=60, what="4/4, protected"
    )
    body = gsd(cluster)
    assert "ghostserve.io/finalizer" in body["metadata"]["finalizers"]
    # One pod per replica holding every rank of it: TP inside the pod, all its GPUs on one node.
    names = sorted(p["metadata"]["name"] for p in cluster.list(harness.PODS, NS))
    assert names == [f"{NAME}-r0", f"{NAME}-r1"]
    r0, r1 = pod(cluster, 0), pod(cluster, 1)
    assert r0 and r1 and r0["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    container = r0["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2" and len(harness.gpus_of(r0)) == 2
    args = container["args"]
    assert args[args.index("--tp-size") + 1] == "2" and "--nnodes" not in args and "--node-rank" not in args
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GHOSTSERVE_GROUP"] == f"{NS}/{NAME}-r0" and env["GHOSTSERVE_WORLD_SIZE"] == "2"
    rows = body["status"]["ranks"]
    for replica in (0, 1):
        mine = [r for r in rows if r["group"] == replica]
        assert len(mine) == 2 and len({r["node"] for r in mine}) == 1  # a stripe never spans nodes
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    generation = body["metadata"]["generation"]
    assert all(c["observedGeneration"] == generation for c in body["status"]["conditions"])
    assert body["status"]["protection"] == {  # both stand-ins report 4 protected chunks, 0 unprotected
        "protectedChunks": 8, "unprotectedChunks": 0, "parityBytes": 2048, "protected": "yes"
    }  # fmt: skip

    # A GPU no rank holds (the sidecar stamps no group): a warning, nothing else; never "GPU 0".
    node0 = r0["spec"]["nodeName"]
    spare = next(
        f"GPU-{node0}-{i}"
        for i in range(4)
        if f"GPU-{node0}-{i}" not in harness.gpus_of(r0) + harness.gpus_of(r1)
    )
    cluster.fail_gpu(node0, spare)

    # Process fault: replica 0's engine is OOM-killed -> restarted in place, nothing marked lost.
    crash(cluster, 0)
    cluster.wait_for(lambda: recovered(cluster, 1, 4), timeout=60, what="process recovery")
    last = gsd(cluster)["status"]["lastRecovery"]
    assert (last["kind"], last["reason"], last["group"], last["outcome"], last["kv"]) == (
        "process",
        "OOMKilled",
        0,
        "Succeeded",
        "Preserved",
    )
    assert last["bytesRebuilt"] == 0 and last["recoveredAt"] >= last["detectedAt"]
    new_r0 = pod(cluster, 0)
    assert new_r0 and new_r0["metadata"]["uid"] != r0["metadata"]["uid"]
    assert new_r0["spec"]["nodeName"] == node0
    assert pod(cluster, 1)["metadata"]["uid"] == r1["metadata"]["uid"]  # type: ignore[index]
    assert not cluster.calls("MarkLost") and spare not in str(gsd(cluster)["status"])

    # Device fault on rank 1 of replica 1: exactly that rank is lost; same-node GPU swap (the node
    # still has 2 healthy free GPUs), rebuilt on that node's sidecar only; replica 0 untouched.
    r1_now = pod(cluster, 1)
    assert r1_now is not None
    node1, bad = r1_now["spec"]["nodeName"], harness.gpus_of(r1_now)[1]
    cluster.fail_gpu(node1, bad)
    cluster.wait_for(lambda: recovered(cluster, 2, 4), timeout=60, what="device recovery")
    last = gsd(cluster)["status"]["lastRecovery"]
    assert (last["kind"], last["reason"], last["group"], last["ranks"], last["outcome"], last["kv"]) == (
        "device",
        "Xid",
        1,
        [1],
        "Succeeded",
        "Rebuilt",
    )
    assert last["bytesRebuilt"] == harness.StandInSidecar.REBUILT_BYTES and last["chunksRebuilt"] == 3
    swapped = pod(cluster, 1)
    assert swapped and swapped["metadata"]["uid"] != r1["metadata"]["uid"]
    assert swapped["spec"]["nodeName"] == node1 and bad not in harness.gpus_of(swapped)
    assert pod(cluster, 0)["metadata"]["uid"] == new_r0["metadata"]["uid"]  # type: ignore[index]
    marks = cluster.calls("MarkLost")
    assert [(n, r.group, list(r.ranks)) for n, _, r in marks] == [(node1, f"{NS}/{NAME}-r1", [1])]
    steps = {"MarkLost", "PlanRecovery", "Rebuild"}
    order = [n for node, n, _ in cluster.calls() if node == node1 and n in steps]
    assert order == ["MarkLost", "PlanRecovery", "Rebuild"]
    assert {node for node, _, _ in cluster.calls("Rebuild")} == {node1}
    wanted = {"FaultProcess", "FaultDevice", "ReplacementPlaced", "RecoverySucceeded"}
    cluster.wait_for(lambda: wanted <= set(reasons(cluster)), timeout=30, what="Events")
    with urllib.request.urlopen(operator.metrics_url, timeout=10) as response:
        metrics = response.read().decode()
    assert 'ghostserve_operator_recoveries_total{kind="process",outcome="Succeeded"} 1.0' in metrics
    assert 'ghostserve_operator_faults_total{kind="device",reason="Xid"} 1.0' in metrics
    with urllib.request.urlopen(operator.liveness_url, timeout=10) as response:
        assert response.status == 200

    # Delete: pods and finalizer go; each node's sidecar is asked to free the group it holds.
    cluster.write("delete", harness.GSD, NS, NAME)
    cluster.wait_for(lambda: cluster.get(harness.GSD, NS, NAME) is None, timeout=60, what="deletion")
    assert not [p for p in cluster.list(harness.PODS, NS) if p["metadata"]["name"].startswith(f"{NAME}-r")]
    deleted = {(node, r.group) for node, _, r in cluster.calls("DeleteGroup")}
    assert {(node0, f"{NS}/{NAME}-r0"), (node1, f"{NS}/{NAME}-r1")} <= deleted


def test_gpu_swap_to_another_node_when_the_replica_fills_its_node(
    cluster: harness.Cluster, operator: harness.OperatorProcess
) -> None:
    cluster.write("create", harness.GSD, NS, None, deployment(tp=4, replicas=2))
    cluster.wait_for(lambda: serving(cluster, 8), timeout=60, what="Serving 8/8")
    before, other = pod(cluster, 0), pod(cluster, 1)
    assert before is not None and other is not None
    node, bad = before["spec"]["nodeName"], harness.gpus_of(before)[2]
    gid = f"{NS}/{NAME}-r0"
    # 3 healthy GPUs left on the node: TP=4 must move, to the one node with 4 free (not replica 1's).
    cluster.fail_gpu(node, bad)
    cluster.wait_for(lambda: recovered(cluster, 1, 8), timeout=60, what="device recovery elsewhere")
    last = gsd(cluster)["status"]["lastRecovery"]
    after = pod(cluster, 0)
    assert after is not None
    target = after["spec"]["nodeName"]
    assert target not in {node, other["spec"]["nodeName"]}
    assert (last["kind"], last["ranks"], last["sourceNode"]) == ("device", [2], node)
    assert last["targetNode"] == target
    assert (last["outcome"], last["kv"], last["bytesRebuilt"]) == ("Succeeded", "Moved", 4096)
    assert last["bytesMoved"] == 4 * harness.StandInSidecar.POOL_BYTES
    # Lost rank rebuilt where the survivors are, THEN the whole group streamed to the new node's
    # sidecar, THEN the engine started there (pinned), THEN the source's copy freed.
    seq = [rpc for n, rpc, r in cluster.calls() if getattr(r, "group", "") == gid and rpc != "DescribeGroup"]
    assert seq == ["MarkLost", "PlanRecovery", "Rebuild", "MoveGroup", "DeleteGroup"]
    assert {n for n, rpc, r in cluster.calls() if getattr(r, "group", "") == gid and rpc in seq} == {node}
    move = cluster.calls("MoveGroup")[0][2]
    assert move.target == f"{harness.node_ip(cluster.node_names.index(target))}:{cluster.sidecar_port}"
    assert gid in cluster.sidecars[target].groups and gid not in cluster.sidecars[node].groups
    affinity = after["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "kubernetes.io/hostname", "operator": "In", "values": [target]} in affinity[
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    assert pod(cluster, 1)["metadata"]["uid"] == other["metadata"]["uid"]  # type: ignore[index]

    # The same on replica 1, with the move failing every time: the recovery says the KV did not follow
    # (Degraded), and that the replica's KV is recomputed on the new node, not moved.
    node1 = other["spec"]["nodeName"]
    cluster.add_node("n3", gpus=4)  # the only node left with 4 healthy free GPUs
    cluster.sidecars[node1].fail["MoveGroup"] = 10
    cluster.fail_gpu(node1, harness.gpus_of(other)[0])
    cluster.wait_for(lambda: gsd(cluster)["status"].get("recoveries") == 2, timeout=60, what="2nd recovery")
    last = gsd(cluster)["status"]["lastRecovery"]
    assert (last["outcome"], last["kv"], last["group"]) == ("Degraded", "Recomputed", 1)
    assert "moved none" in last["message"] and "moveGroup given up" in last["message"]
    cluster.wait_for(lambda: "RecoveryDegraded" in reasons(cluster), timeout=30, what="Degraded Event")


def test_unschedulable_replacement_is_reported(
    cluster: harness.Cluster, operator: harness.OperatorProcess
) -> None:
    cluster.write("create", harness.GSD, NS, None, deployment(tp=4, replicas=3))
    cluster.wait_for(lambda: serving(cluster, 12), timeout=60, what="Serving 12/12")
    victim = pod(cluster, 1)
    assert victim is not None
    cluster.fail_gpu(victim["spec"]["nodeName"], harness.gpus_of(victim)[0])
    # Every node is full and the victim's node lost a GPU: no node has 4 healthy free GPUs.
    cluster.wait_for(
        lambda: "ReplacementUnschedulable" in reasons(cluster)
        and any(
            c["type"] == "Ready" and c["reason"] == "ReplacementUnschedulable"
            for c in gsd(cluster)["status"].get("conditions") or []
        ),
        timeout=60,
        what="unschedulable replacement reported",
    )
    status = gsd(cluster)["status"]
    assert status["phase"] == "Recovering" and "never spans nodes" in str(status["conditions"])
    assert pod(cluster, 1) is None  # deleted; nothing created that could not run


def test_resume_gateway_per_deployment(cluster: harness.Cluster, tmp_path: pathlib.Path) -> None:
    image = "ghcr.io/ghostserve/ghostserve:test"
    proc = harness.OperatorProcess(
        cluster.kubeconfig(tmp_path / "kubeconfig"),
        tmp_path / "operator.log",
        sidecar_port=cluster.sidecar_port,
        env_extra={"GHOSTSERVE_GATEWAY_IMAGE": image},
    )
    try:
        cluster.write("create", harness.GSD, NS, None, deployment(replicas=2))
        cluster.wait_for(
            lambda: serving(cluster, 4) and gsd(cluster)["status"].get("gatewayURL"), timeout=60, what="gw"
        )
        assert gsd(cluster)["status"]["gatewayURL"] == f"http://{NAME}.{NS}.svc:8000"
        gateway = cluster.get(harness.PODS, NS, f"{NAME}-gateway")
        assert gateway is not None and gateway["metadata"]["ownerReferences"][0]["name"] == NAME
        container = gateway["spec"]["containers"][0]
        assert container["image"] == image and container["args"][0] == "gateway"
        args = container["args"]
        selector = args[args.index("--selector") + 1]
        assert selector == f"ghostserve.io/deployment={NAME},app.kubernetes.io/component=engine"
        assert args[args.index("--namespace") + 1] == NS and args[args.index("--backend-port") + 1] == "30000"
        # The selector picks exactly the replica pods, not the gateway itself.
        wanted = dict(kv.split("=") for kv in selector.split(","))
        picked = sorted(
            p["metadata"]["name"]
            for p in cluster.list(harness.PODS, NS)
            if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
        )
        assert picked == [f"{NAME}-r0", f"{NAME}-r1"]
        service = cluster.get(harness.SERVICES, NS, NAME)
        assert service is not None
        assert all(gateway["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
        assert service["spec"]["ports"][0]["port"] == 8000
        # A dead gateway is replaced.
        cluster.write("update", harness.PODS, NS, f"{NAME}-gateway", {"status": {"phase": "Failed"}})
        cluster.wait_for(
            lambda: (found := cluster.get(harness.PODS, NS, f"{NAME}-gateway")) is not None
            and found["metadata"]["uid"] != gateway["metadata"]["uid"],
            timeout=60,
            what="gateway replaced",
        )
    finally:
        proc.stop()
        print(proc.output()[-4000:])
