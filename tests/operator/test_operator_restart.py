"""The operator SIGKILLed at every step boundary and inside every sidecar call of a recovery, for
process, device (same node and other node) and node faults: each run ends with the right pods,
sidecar state (KV where it belongs) and status.

One recovery per fault kind walks through every crash point in order: operator k is started with
GHOSTSERVE_OPERATOR_CRASH_AT = point k (crashpoints.py) and kills itself with SIGKILL there; operator
k+1 resumes from whatever was recorded and dies at point k+1; a last operator finishes. So every
point is a place where the operator died AND a place a fresh operator had to resume from. `after:X`
points die after sidecar call X returned and before its result was recorded: the next operator
repeats the call, which must be idempotent.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from tests.operator import harness
from tests.operator.test_operator_kopf import NAME, NS, deployment, gsd, pod, recovered

GID = f"{NS}/{NAME}-r0"
COMMON = ["before:PodDeleted", "before:Placed", "before:KVReady", "before:PodCreated", "after:createPod"]
TAIL = ["before:Running", "before:Done", "before:finish"]
LOST = ["after:describe", "before:MarkedLost", "after:markLost", "before:PodDeleted"]
LOST += ["before:Rebuilt", "after:rebuild"]
CHAINS = {
    "process": COMMON + TAIL,
    "device-same-node": [*LOST, *COMMON[1:], *TAIL],
    "device-other-node": [
        *LOST,
        *("before:Placed", "before:KVReady", "after:moveGroup", "before:PodCreated", "after:createPod"),
        *("before:Running", "before:Released", "after:deleteGroup", "before:Done", "before:finish"),
    ],
    "node": COMMON + TAIL,
}


def inject(cluster: harness.Cluster, kind: str, victim: dict[str, Any]) -> None:
    node = victim["spec"]["nodeName"]
    if kind == "process":
        cluster.write(
            "update",
            harness.PODS,
            NS,
            victim["metadata"]["name"],
            {
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [
                        {"name": "engine", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
                    ],
                }
            },
        )
    elif kind.startswith("device"):
        cluster.fail_gpu(node, harness.gpus_of(victim)[1])
    else:
        cluster.write(
            "update",
            harness.NODES,
            None,
            node,
            {"status": {"conditions": [{"type": "Ready", "status": "False", "message": "kubelet stopped"}]}},
        )


@pytest.mark.parametrize("kind", sorted(CHAINS))
def test_operator_killed_at_every_step(cluster: harness.Cluster, tmp_path: pathlib.Path, kind: str) -> None:
    tp = 4 if kind == "device-other-node" else 2
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")

    def start(log: str, crash_at: str | None = None) -> harness.OperatorProcess:
        return harness.OperatorProcess(
            kubeconfig, tmp_path / log, sidecar_port=cluster.sidecar_port, crash_at=crash_at
        )

    points = CHAINS[kind]
    first = start("op-0.log", points[0])
    cluster.write("create", harness.GSD, NS, None, deployment(tp=tp))
    cluster.wait_for(
        lambda: gsd(cluster).get("status", {}).get("ready") == f"{tp}/{tp}"
        and "Protected" in str(gsd(cluster)["status"].get("conditions")),
        timeout=60,
        what="serving",
    )
    victim = pod(cluster, 0)
    assert victim is not None
    source, bad = victim["spec"]["nodeName"], harness.gpus_of(victim)[1]
    inject(cluster, kind, victim)
    current = first
    try:
        for i, point in enumerate(points):
            assert current.killed_itself(60), f"operator {i} did not reach {point}:\n{cluster.dump()}"
            current.stop()
            nxt = points[i + 1] if i + 1 < len(points) else None
            current = start(f"op-{i + 1}.log", nxt)
        cluster.wait_for(lambda: recovered(cluster, 1, tp), timeout=90, what="recovered after the kills")
    finally:
        current.stop()
        print(current.output()[-5000:])

    status = gsd(cluster)["status"]
    last = status["lastRecovery"]
    after = pod(cluster, 0)
    assert after is not None and after["metadata"]["uid"] != victim["metadata"]["uid"]
    assert status["recoveries"] == 1 and status["phase"] == "Serving" and not status.get("inFlight")
    assert sum(1 for p in cluster.list(harness.PODS, NS) if p["metadata"]["name"].startswith(NAME)) == 1
    holders = {node for node, side in cluster.sidecars.items() if GID in side.groups}
    if kind == "process":
        assert (last["kind"], last["outcome"], last["kv"]) == ("process", "Succeeded", "Preserved")
        assert after["spec"]["nodeName"] == source and not cluster.calls("MarkLost")
        assert holders == {source}
    elif kind == "device-same-node":
        assert (last["kind"], last["ranks"]) == ("device", [1])
        assert (last["outcome"], last["kv"]) == ("Succeeded", "Rebuilt")
        assert after["spec"]["nodeName"] == source and bad not in harness.gpus_of(after)
        # MarkLost repeated once (killed after it returned), always on rank 1 only, before any Rebuild.
        assert [list(r.ranks) for _, _, r in cluster.calls("MarkLost")] == [[1], [1]]
        assert last["bytesRebuilt"] == harness.StandInSidecar.REBUILT_BYTES
        assert holders == {source} and not cluster.sidecars[source].invalid.get(GID)
    elif kind == "device-other-node":
        target = after["spec"]["nodeName"]
        assert target != source and (last["outcome"], last["kv"]) == ("Succeeded", "Moved")
        # The repeated MoveGroup found the group already there (0 bytes): the target's verified copy counts.
        assert last["bytesMoved"] == tp * harness.StandInSidecar.POOL_BYTES
        assert len(cluster.calls("MoveGroup")) == 2 and holders == {target}
    else:
        assert (last["kind"], last["reason"], last["outcome"], last["kv"]) == (
            "node",
            "NodeNotReady",
            "Succeeded",
            "Recomputed",
        )
        assert after["spec"]["nodeName"] != source and "KV recomputed" in last["message"]
        assert not cluster.calls("MarkLost") and not cluster.calls("MoveGroup")
