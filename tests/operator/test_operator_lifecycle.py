"""Spec changes, several faults at once, fault policy and budget, refused specs: a real operator
process against the emulator with one sidecar stand-in per node."""

from __future__ import annotations

import pathlib
import time
from typing import Any

from tests.operator import harness
from tests.operator.test_operator_kopf import (
    NAME,
    NS,
    crash,
    deployment,
    gsd,
    pod,
    reasons,
    recovered,
    serving,
)


async def _listen(cluster: harness.Cluster, fn: Any) -> None:
    cluster.emulator.listeners.append(fn)


def test_tp_across_nodes_is_refused(cluster: harness.Cluster, operator: harness.OperatorProcess) -> None:
    bad = deployment()
    bad["metadata"]["name"] = "broken"
    bad["spec"]["engine"]["args"] = ["--nnodes", "2", "--node-rank", "0"]
    cluster.write("create", harness.GSD, NS, None, bad)
    cluster.wait_for(
        lambda: ((cluster.get(harness.GSD, NS, "broken") or {}).get("status") or {}).get("phase") == "Failed",
        timeout=60,
        what="refused",
    )
    cond = cluster.get(harness.GSD, NS, "broken")["status"]["conditions"][0]  # type: ignore[index]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Ready", "False", "InvalidSpec")
    assert "tensor parallelism across nodes" in cond["message"]
    assert not cluster.list(harness.PODS, NS)


def _env(p: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}


def test_spec_changes_roll_and_reset_sidecar_groups(
    cluster: harness.Cluster, operator: harness.OperatorProcess
) -> None:
    writes: list[tuple[str, str, str, str]] = []  # (action, pod, uid, phase) in emulator order

    def record(action: str, resource: Any, raw: dict[str, Any]) -> None:
        if resource == harness.PODS:
            meta = raw["metadata"]
            phase = (raw.get("status") or {}).get("phase", "")
            writes.append((action, meta["name"], meta.get("uid", ""), phase))

    cluster.call(lambda: _listen(cluster, record))
    cluster.write("create", harness.GSD, NS, None, deployment(replicas=2))
    cluster.wait_for(lambda: serving(cluster, 4), timeout=60, what="4/4 serving")
    nodes = {r: pod(cluster, r)["spec"]["nodeName"] for r in (0, 1)}  # type: ignore[index]

    # An image change rolls one replica at a time and keeps the sidecar groups (same settings).
    writes.clear()
    cluster.write("update", harness.GSD, NS, NAME, {"spec": {"engine": {"image": "lmsysorg/sglang:v0.5.4"}}})

    def rolled(tag: str) -> bool:
        body = gsd(cluster)
        pods = [pod(cluster, r) for r in (0, 1)]
        return (
            body["status"].get("observedGeneration") == body["metadata"]["generation"]
            and serving(cluster, 4)
            and all(p and p["spec"]["containers"][0]["image"].endswith(tag) for p in pods)
        )

    cluster.wait_for(lambda: rolled("v0.5.4"), timeout=90, what="rolled to the new image")
    deletes = [i for i, w in enumerate(writes) if w[0] == "delete"]
    assert len(deletes) == 2  # one per replica: a freshly created pod is never rolled again
    created = {w[2] for w in writes if w[0] == "create"}
    assert not {writes[i][2] for i in deletes} & created
    first_r1_delete = min(i for i in deletes if writes[i][1] == f"{NAME}-r1")
    r0_running = [i for i, w in enumerate(writes) if w[1] == f"{NAME}-r0" and w[3] == "Running"]
    assert r0_running and max(r0_running) < first_r1_delete  # replica 1 waited for replica 0
    assert not cluster.calls("DeleteGroup")

    # A protection change needs new sidecar groups: each is deleted on its node before its new pod
    # exists (else the sidecar refuses the new Attach), and an Event says the KV is recomputed.
    writes.clear()
    change = {"spec": {"protection": {"code": "rs", "parityShards": 1}}}
    cluster.write("update", harness.GSD, NS, NAME, change)
    # Both pods must exist with the new code: status.ready can still say 4/4 from before a pod's deletion.
    cluster.wait_for(
        lambda: serving(cluster, 4) and all(
            p is not None and _env(p)["GHOSTSERVE_CODE"] == "rs" for p in (pod(cluster, 0), pod(cluster, 1))
        ),
        timeout=90,
        what="rolled to rs",
    )
    cluster.wait_for(lambda: len(cluster.calls("DeleteGroup")) == 2, timeout=30, what="groups reset")
    resets = {(n, r.group) for n, _, r in cluster.calls("DeleteGroup")}
    assert resets == {(nodes[0], f"{NS}/{NAME}-r0"), (nodes[1], f"{NS}/{NAME}-r1")}
    cluster.wait_for(lambda: reasons(cluster).count("SidecarGroupReset") == 2, timeout=30, what="resets")

    # Scale down: replica 1's pod goes and its group is freed on the node that holds it.
    r1_node = pod(cluster, 1)["spec"]["nodeName"]  # type: ignore[index]
    cluster.write("update", harness.GSD, NS, NAME, {"spec": {"engine": {"replicas": 1}}})
    cluster.wait_for(
        lambda: gsd(cluster)["status"].get("ready") == "2/2" and pod(cluster, 1) is None,
        timeout=60,
        what="scaled down",
    )
    cluster.wait_for(
        lambda: (r1_node, f"{NS}/{NAME}-r1") in {(n, r.group) for n, _, r in cluster.calls("DeleteGroup")[2:]},  # noqa: E501
        timeout=30,
        what="replica 1's group freed",
    )


def test_several_faults_at_once_each_placed_by_its_own(
    cluster: harness.Cluster, tmp_path: pathlib.Path
) -> None:
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    first = harness.OperatorProcess(kubeconfig, tmp_path / "first.log", sidecar_port=cluster.sidecar_port)
    try:
        cluster.write("create", harness.GSD, NS, None, deployment(replicas=2))
        cluster.wait_for(lambda: serving(cluster, 4), timeout=60, what="4/4 serving")
    finally:
        first.kill()
    r0, r1 = pod(cluster, 0), pod(cluster, 1)
    assert r0 is not None and r1 is not None
    n0, n1 = r0["spec"]["nodeName"], r1["spec"]["nodeName"]
    assert n0 != n1
    # While no operator runs: replica 0's engine dies AND its rank-0 GPU fails (mixed kinds in one
    # replica); replica 1's node goes NotReady. The next operator sees all of it at once.
    crash(cluster, 0)
    cluster.fail_gpu(n0, harness.gpus_of(r0)[0])
    cluster.write(
        "update", harness.NODES, None, n1, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    )
    second = harness.OperatorProcess(kubeconfig, tmp_path / "second.log", sidecar_port=cluster.sidecar_port)
    try:
        cluster.wait_for(lambda: recovered(cluster, 2, 4), timeout=90, what="both replicas recovered")
    finally:
        second.stop()
        print(second.output()[-4000:])
    a0, a1 = pod(cluster, 0), pod(cluster, 1)
    assert a0 is not None and a1 is not None
    # Replica 0: only the device-faulted rank is lost (the crashed engine's other rank kept its KV),
    # rebuilt on its own node, where the GPU swap happened. Replica 1: away from the dead node.
    marks = [(n, r.group, list(r.ranks)) for n, _, r in cluster.calls("MarkLost")]
    assert marks == [(n0, f"{NS}/{NAME}-r0", [0])]
    assert a0["spec"]["nodeName"] == n0 and harness.gpus_of(r0)[0] not in harness.gpus_of(a0)
    assert a1["spec"]["nodeName"] not in {n1} and {n for n, _, _ in cluster.calls("Rebuild")} == {n0}
    def fault_events() -> list[str]:
        wanted = {"FaultDevice", "FaultNode"}
        return [e["message"] for e in cluster.list(harness.EVENTS, NS) if e.get("reason") in wanted]

    cluster.wait_for(
        lambda: any("replica 0" in m and "ranks [0] lost" in m for m in fault_events())
        and any("replica 1" in m and "NodeNotReady" in m for m in fault_events()),
        timeout=30,
        what="one fault Event per replica",
    )


def test_group_policy_and_recovery_budget(
    cluster: harness.Cluster, operator: harness.OperatorProcess
) -> None:
    cluster.write("create", harness.GSD, NS, None, deployment(faultPolicy="group", maxRecoveriesPerHour=1))
    cluster.wait_for(lambda: serving(cluster), timeout=60, what="Serving 2/2")
    before = pod(cluster, 0)
    assert before is not None
    node = before["spec"]["nodeName"]
    # faultPolicy group: a GPU fault resets the whole sidecar group (KV recomputed), nothing rebuilt.
    cluster.fail_gpu(node, harness.gpus_of(before)[1])
    cluster.wait_for(lambda: recovered(cluster, 1), timeout=60, what="group recovery")
    last = gsd(cluster)["status"]["lastRecovery"]
    assert (last["kind"], last["outcome"], last["kv"]) == ("device", "Succeeded", "Recomputed")
    assert not cluster.calls("MarkLost") and not cluster.calls("Rebuild")
    assert (node, f"{NS}/{NAME}-r0") in {(n, r.group) for n, _, r in cluster.calls("DeleteGroup")}
    cluster.wait_for(lambda: "SidecarGroupReset" in reasons(cluster), timeout=30, what="reset Event")

    # The hourly budget (1) is spent: the next fault is reported, not acted on.
    crash(cluster, 0)
    cluster.wait_for(lambda: gsd(cluster)["status"]["phase"] == "Failed", timeout=60, what="out of budget")
    status = gsd(cluster)["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RecoveryBudgetExhausted")
    assert status["recoveries"] == 1 and status["ready"] == "0/2"
    cluster.wait_for(lambda: "RecoveryBudgetExhausted" in reasons(cluster), timeout=30, what="budget Event")


def test_restart_mid_roll_never_resets_a_running_replicas_group(
    cluster: harness.Cluster, tmp_path: pathlib.Path
) -> None:
    """A fresh operator's pod view starts empty: a replica whose pod is merely not listed yet must not
    have its sidecar group reset (its KV is live) just because its settings hash is stale."""
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    deleted: dict[str, float] = {}  # pod name -> when the roll deleted it

    def record(action: str, resource: Any, raw: dict[str, Any]) -> None:
        if resource == harness.PODS and action == "delete":
            deleted.setdefault(raw["metadata"]["name"], time.monotonic())

    first = harness.OperatorProcess(kubeconfig, tmp_path / "first.log", sidecar_port=cluster.sidecar_port)
    try:
        cluster.write("create", harness.GSD, NS, None, deployment(replicas=2))
        cluster.wait_for(lambda: serving(cluster, 4), timeout=60, what="4/4 serving")
        cluster.wait_for(lambda: len(gsd(cluster)["status"].get("sidecarGroups") or []) == 2, what="groups")
    finally:
        first.kill()
    cluster.call(lambda: _listen(cluster, record))
    change = {"spec": {"protection": {"code": "rs", "parityShards": 1}}}
    cluster.write("update", harness.GSD, NS, NAME, change)
    second = harness.OperatorProcess(kubeconfig, tmp_path / "second.log", sidecar_port=cluster.sidecar_port)
    try:
        cluster.wait_for(
            lambda: len(cluster.calls("DeleteGroup")) == 2 and serving(cluster, 4), timeout=90, what="reset"
        )
    finally:
        second.stop()
    for replica in (0, 1):
        [when] = [
            t
            for side in cluster.sidecars.values()
            for n, r, t in side.calls
            if n == "DeleteGroup" and r.group == f"{NS}/{NAME}-r{replica}"
        ]
        assert when > deleted[f"{NAME}-r{replica}"], f"replica {replica}'s group reset while its pod ran"
