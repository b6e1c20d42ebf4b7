"""A real `ghostserve operator` (kopf) process against the kmock API emulator."""

from __future__ import annotations

import pathlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.operator import harness

NS, NAME = "test", "llama"


def deployment(sidecar_port: int, **recovery: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ghostserve.io/v1alpha1",
        "kind": "GhostServeDeployment",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "engine": {"image": "lmsysorg/sglang:v0.5.3", "tensorParallel": 2},
            "protection": {"code": "xor", "parityShards": 1},
            "recovery": {"backoffSeconds": 0, **recovery},
            "sidecar": {"port": sidecar_port},
        },
    }


@pytest.fixture
def operator(cluster: harness.Cluster, tmp_path: pathlib.Path) -> Iterator[harness.OperatorProcess]:
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    metrics, liveness = harness.free_port(), harness.free_port()
    proc = harness.OperatorProcess(
        kubeconfig,
        tmp_path / "operator.log",
        "--metrics-port",
        str(metrics),
        "--liveness",
        f"http://127.0.0.1:{liveness}/healthz",
    )
    proc.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    proc.liveness_url = f"http://127.0.0.1:{liveness}/healthz"
    yield proc
    proc.stop()
    print(proc.output()[-20000:])


def gsd(cluster: harness.Cluster) -> dict[str, Any]:
    found = cluster.get(harness.GSD, NS, NAME)
    assert found is not None
    return found


def pod(cluster: harness.Cluster, group: int, rank: int) -> dict[str, Any] | None:
    return cluster.get(harness.PODS, NS, f"{NAME}-g{group}-r{rank}")


def serving(cluster: harness.Cluster) -> bool:
    status = (cluster.get(harness.GSD, NS, NAME) or {}).get("status") or {}
    return status.get("phase") == "Serving" and status.get("ready") == "2/2"


def test_create_fault_recover_delete(cluster: harness.Cluster, operator: harness.OperatorProcess) -> None:
    cluster.write("create", harness.GSD, NS, None, deployment(cluster.sidecar_port))
    cluster.wait_for(lambda: serving(cluster), timeout=60, what="Serving 2/2")
    body = gsd(cluster)
    assert "ghostserve.io/finalizer" in body["metadata"]["finalizers"]
    svc = cluster.get(harness.SERVICES, NS, NAME)
    assert svc is not None and svc["spec"]["clusterIP"] == "None"
    r0, r1 = pod(cluster, 0, 0), pod(cluster, 0, 1)
    assert r0 and r1 and r0["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    assert r0["spec"]["nodeName"] != r1["spec"]["nodeName"]  # least-allocated placement spreads them
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]

    # Process fault: the engine of rank 0 is OOM-killed (exit 137) -> restart in place, nothing rebuilt.
    cluster.write(
        "update",
        harness.PODS,
        NS,
        r0["metadata"]["name"],
        {
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "engine",
                        "restartCount": 0,
                        "ready": False,
                        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                    }
                ],
            }
        },
    )
    cluster.wait_for(
        lambda: gsd(cluster)["status"].get("recoveries") == 1 and serving(cluster),
        timeout=60,
        what="process recovery",
    )
    last = gsd(cluster)["status"]["lastRecovery"]
    assert (last["kind"], last["reason"], last["rank"], last["outcome"]) == (
        "process",
        "OOMKilled",
        0,
        "Succeeded",
    )
    assert last["bytesRebuilt"] == 0 and last["seconds"] >= 0 and last["recoveredAt"] >= last["detectedAt"]
    new_r0 = pod(cluster, 0, 0)
    assert new_r0 and new_r0["metadata"]["uid"] != r0["metadata"]["uid"]
    assert new_r0["spec"]["nodeName"] == r0["spec"]["nodeName"]
    assert pod(cluster, 0, 1)["metadata"]["uid"] == r1["metadata"]["uid"]  # type: ignore[index]
    assert "MarkLost" not in cluster.sidecar.names()

    # Device fault by tainting rank 1's node: only rank 1 moves, off that node; the sidecar rebuilds.
    bad = r1["spec"]["nodeName"]
    cluster.write(
        "update",
        harness.NODES,
        None,
        bad,
        {"spec": {"taints": [{"key": "nvidia.com/gpu-unhealthy", "value": "xid79", "effect": "NoSchedule"}]}},
    )
    cluster.wait_for(
        lambda: gsd(cluster)["status"].get("recoveries") == 2 and serving(cluster),
        timeout=60,
        what="device recovery",
    )
    last = gsd(cluster)["status"]["lastRecovery"]
    assert (last["kind"], last["reason"], last["rank"], last["outcome"]) == (
        "device",
        "GpuTaint",
        1,
        "Succeeded",
    )
    assert last["bytesRebuilt"] == harness.StandInSidecar.REBUILT_BYTES
    assert last["chunksRebuilt"] == 3 and last["chunksRecomputed"] == 1
    moved = pod(cluster, 0, 1)
    assert moved and moved["spec"]["nodeName"] != bad
    assert pod(cluster, 0, 0)["metadata"]["uid"] == new_r0["metadata"]["uid"]  # type: ignore[index]
    names = cluster.sidecar.names()
    assert names.index("MarkLost") < names.index("PlanRecovery") < names.index("Rebuild")
    mark = next(req for n, req, _ in cluster.sidecar.calls if n == "MarkLost")
    assert (mark.group, list(mark.ranks)) == (f"{NS}/{NAME}-g0", [1])
    reasons = {e.get("reason") for e in cluster.list(harness.EVENTS, NS)}
    assert {"FaultProcess", "FaultDevice", "RecoverySucceeded"} <= reasons
    with urllib.request.urlopen(operator.metrics_url, timeout=10) as response:
        metrics = response.read().decode()
    assert 'ghostserve_operator_recoveries_total{kind="process",outcome="Succeeded"} 1.0' in metrics
    assert 'ghostserve_operator_faults_total{kind="device",reason="GpuTaint"} 1.0' in metrics
    assert f"ghostserve_operator_bytes_rebuilt_total {float(harness.StandInSidecar.REBUILT_BYTES)}" in metrics
    with urllib.request.urlopen(operator.liveness_url, timeout=10) as response:
        assert response.status == 200

    # Delete: pods, Service and finalizer go; the sidecar is asked to free the group.
    cluster.write("delete", harness.GSD, NS, NAME)
    cluster.wait_for(lambda: cluster.get(harness.GSD, NS, NAME) is None, timeout=60, what="deletion")
    assert cluster.list(harness.PODS, NS) == []
    assert cluster.get(harness.SERVICES, NS, NAME) is None
    assert any(n == "DeleteGroup" and r.group == f"{NS}/{NAME}-g0" for n, r, _ in cluster.sidecar.calls)


def test_restart_mid_recovery_and_api_errors(cluster: harness.Cluster, tmp_path: pathlib.Path) -> None:
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    first = harness.OperatorProcess(kubeconfig, tmp_path / "first.log")
    try:
        cluster.write("create", harness.GSD, NS, None, deployment(cluster.sidecar_port))
        cluster.wait_for(lambda: serving(cluster), timeout=60, what="Serving 2/2")
        r1 = pod(cluster, 0, 1)
        assert r1 is not None
        node, gpu = r1["spec"]["nodeName"], r1["metadata"]["annotations"]["ghostserve.io/gpu"]
        # Hold replacements in Pending (no kubelet progress) so the recovery stops half-way.
        cluster.nodes.auto_run = False
        cluster.push_health(
            harness.sidecar_pb2.HealthEvent(
                gpu_index=int(gpu),
                kind=harness.sidecar_pb2.XID,
                xid=79,
                fatal=True,
                message="fell off the bus",
                node=node,
            )
        )
        cluster.wait_for(
            lambda: (
                (gsd(cluster)["status"].get("recovery") or {}).get("step") == "ReplacementsCreated"
                and gsd(cluster)["status"]["phase"] == "Recovering"
            ),
            timeout=60,
            what="recovery in flight",
        )
    finally:
        first.kill()
    assert cluster.sidecar.names().count("MarkLost") == 1 and "Rebuild" not in cluster.sidecar.names()

    # API trouble for the next operator: failed status patches, a conflict, a broken pod watch.
    cluster.emulator.inject(500, 2, method="PATCH", plural="ghostservedeployments")
    cluster.emulator.inject(409, 1, method="PATCH", plural="ghostservedeployments")
    cluster.emulator.inject(500, 1, plural="pods", watch=True)
    cluster.nodes.auto_run = True
    cluster.loop.call_soon_threadsafe(cluster.nodes.kick.set)
    second = harness.OperatorProcess(kubeconfig, tmp_path / "second.log")
    try:
        cluster.wait_for(
            lambda: gsd(cluster)["status"].get("recoveries") == 1 and serving(cluster),
            timeout=90,
            what="recovery finished by the restarted operator",
        )
        last = gsd(cluster)["status"]["lastRecovery"]
        assert (last["kind"], last["reason"], last["rank"], last["outcome"]) == (
            "device",
            "Xid",
            1,
            "Succeeded",
        )
        assert last["bytesRebuilt"] == harness.StandInSidecar.REBUILT_BYTES
        assert cluster.sidecar.names().count("MarkLost") == 1  # not repeated after the restart
        assert cluster.sidecar.names().count("Rebuild") == 1
        replacement = pod(cluster, 0, 1)
        assert replacement is not None and replacement["metadata"]["uid"] != r1["metadata"]["uid"]
        # Same node, another GPU: the device fault named one GPU, the node itself is fine.
        assert replacement["spec"]["nodeName"] == node
        assert replacement["metadata"]["annotations"]["ghostserve.io/gpu"] != gpu
        assert all(i.count == 0 for i in cluster.emulator.injections)

        # Watches dropped: the operator re-watches from its last resourceVersion and still sees faults.
        cluster.call(cluster.emulator.drop_watches)
        r0 = pod(cluster, 0, 0)
        assert r0 is not None
        cluster.write(
            "update",
            harness.PODS,
            NS,
            r0["metadata"]["name"],
            {"status": {"reason": "Evicted", "phase": "Failed", "message": "node memory pressure"}},
        )
        cluster.wait_for(
            lambda: gsd(cluster)["status"].get("recoveries") == 2 and serving(cluster),
            timeout=60,
            what="recovery after dropped watches",
        )
        last = gsd(cluster)["status"]["lastRecovery"]
        assert (last["kind"], last["reason"], last["rank"]) == ("node", "Evicted", 0)
        assert pod(cluster, 0, 0)["spec"]["nodeName"] != r0["spec"]["nodeName"]  # type: ignore[index]
    finally:
        second.stop()
        print(second.output()[-5000:])


def test_invalid_spec_and_rolling_update(cluster: harness.Cluster, operator: harness.OperatorProcess) -> None:
    writes: list[tuple[str, str, str]] = []  # (action, pod, phase) in emulator order

    def record(action: str, resource: Any, raw: dict[str, Any]) -> None:
        if resource == harness.PODS:
            writes.append((action, raw["metadata"]["name"], (raw.get("status") or {}).get("phase", "")))

    cluster.call(lambda: _listen(cluster, record))
    bad = deployment(cluster.sidecar_port)
    bad["metadata"]["name"] = "broken"
    bad["spec"]["protection"] = {"code": "rdp", "parityShards": 1}  # rdp needs 2
    cluster.write("create", harness.GSD, NS, None, bad)
    cluster.wait_for(
        lambda: ((cluster.get(harness.GSD, NS, "broken") or {}).get("status") or {}).get("phase") == "Failed",
        timeout=60,
        what="invalid spec reported",
    )
    cond = cluster.get(harness.GSD, NS, "broken")["status"]["conditions"][0]  # type: ignore[index]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Ready", "False", "InvalidSpec")
    assert "parityShards must be 2 for rdp" in cond["message"]

    good = deployment(cluster.sidecar_port)
    good["spec"]["engine"]["replicas"] = 2
    cluster.write("create", harness.GSD, NS, None, good)
    cluster.wait_for(
        lambda: (
            (gsd(cluster).get("status") or {}).get("ready") == "4/4"
            and gsd(cluster)["status"]["phase"] == "Serving"
        ),
        timeout=60,
        what="4/4 serving",
    )
    assert not [p for p in cluster.list(harness.PODS, NS) if p["metadata"]["name"].startswith("broken")]
    old_hash = pod(cluster, 0, 0)["metadata"]["annotations"]["ghostserve.io/spec-hash"]  # type: ignore[index]

    writes.clear()
    cluster.write("update", harness.GSD, NS, NAME, {"spec": {"engine": {"image": "lmsysorg/sglang:v0.5.4"}}})

    def rolled() -> bool:
        body = gsd(cluster)
        pods = [pod(cluster, g, r) for g in range(2) for r in range(2)]
        return (
            body["status"].get("observedGeneration") == body["metadata"]["generation"]
            and body["status"]["phase"] == "Serving"
            and body["status"]["ready"] == "4/4"
            and all(p and p["spec"]["containers"][0]["image"].endswith("v0.5.4") for p in pods)
        )

    cluster.wait_for(rolled, timeout=90, what="rolled to the new image")
    assert pod(cluster, 1, 1)["metadata"]["annotations"]["ghostserve.io/spec-hash"] != old_hash  # type: ignore[index]
    # One group at a time: group 1 is only deleted after group 0's replacements were running.
    deletes = [i for i, (a, _, _) in enumerate(writes) if a == "delete"]
    first_g1_delete = min(i for i in deletes if writes[i][1].startswith(f"{NAME}-g1-"))
    g0_running = [i for i, (a, n, ph) in enumerate(writes) if n.startswith(f"{NAME}-g0-") and ph == "Running"]
    assert len(g0_running) >= 2 and max(g0_running) < first_g1_delete

    # Scale down: group 1's pods go and its sidecar state is freed.
    cluster.write("update", harness.GSD, NS, NAME, {"spec": {"engine": {"replicas": 1}}})
    cluster.wait_for(
        lambda: (
            gsd(cluster)["status"].get("ready") == "2/2"
            and pod(cluster, 1, 0) is None
            and pod(cluster, 1, 1) is None
        ),
        timeout=60,
        what="scaled down to one group",
    )
    assert any(n == "DeleteGroup" and r.group == f"{NS}/{NAME}-g1" for n, r, _ in cluster.sidecar.calls)


async def _listen(cluster: harness.Cluster, fn: Any) -> None:
    cluster.emulator.listeners.append(fn)


def test_group_policy_and_recovery_budget(
    cluster: harness.Cluster, operator: harness.OperatorProcess
) -> None:
    cluster.write(
        "create",
        harness.GSD,
        NS,
        None,
        deployment(cluster.sidecar_port, faultPolicy="group", maxRecoveriesPerHour=1),
    )
    cluster.wait_for(lambda: serving(cluster), timeout=60, what="Serving 2/2")
    before = {r: pod(cluster, 0, r)["metadata"]["uid"] for r in (0, 1)}  # type: ignore[index]

    def crash(rank: int) -> None:
        name = f"{NAME}-g0-r{rank}"
        cluster.write(
            "update",
            harness.PODS,
            NS,
            name,
            {
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [
                        {"name": "engine", "state": {"terminated": {"exitCode": 139, "reason": "Error"}}}
                    ],
                }
            },
        )

    # faultPolicy group: one rank crashes, the whole group is replaced.
    crash(1)
    cluster.wait_for(
        lambda: gsd(cluster)["status"].get("recoveries") == 1 and serving(cluster),
        timeout=60,
        what="group recovery",
    )
    last = gsd(cluster)["status"]["lastRecovery"]
    assert (last["reason"], last["ranks"], last["rank"]) == ("ContainerTerminated", [0, 1], 0)
    assert all(pod(cluster, 0, r)["metadata"]["uid"] != before[r] for r in (0, 1))  # type: ignore[index]

    # The hourly budget (1) is spent: the next fault is reported, not acted on.
    crash(0)
    cluster.wait_for(lambda: gsd(cluster)["status"]["phase"] == "Degraded", timeout=60, what="degraded")
    status = gsd(cluster)["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RecoveryBudgetExhausted")
    assert status["recoveries"] == 1 and status["ready"] == "1/2"
    assert "RecoveryBudgetExhausted" in {e.get("reason") for e in cluster.list(harness.EVENTS, NS)}
