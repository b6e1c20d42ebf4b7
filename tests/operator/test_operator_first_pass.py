"""An operator restarted while a recovery is recorded handles that deployment first: its recovery
starts while healthy deployments still wait for their first pass (firstpass.py), and every healthy
deployment still gets its first pass without being disturbed. Ordering is read from the sidecar
stand-ins' call log and the operator's own `first-pass-urgent` event, never from timing."""

from __future__ import annotations

import copy
import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.operator import harness
from tests.operator.test_operator_kopf import deployment

NS = "test"
HEALTHY = [f"h{i:02d}" for i in range(24)]
VICTIM = "victim"


def named(name: str, tp: int) -> dict[str, Any]:
    body = copy.deepcopy(deployment(tp=tp))
    body["metadata"]["name"] = name
    return body


def phase(cluster: harness.Cluster, name: str) -> dict[str, Any]:
    return dict(((cluster.get(harness.GSD, NS, name) or {}).get("status")) or {})


def settled(status: dict[str, Any]) -> bool:
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return status.get("phase") == "Serving" and conditions.get("Protected") == "True"


def meta(cluster: harness.Cluster, resource: Any, name: str) -> dict[str, Any]:
    found = cluster.get(resource, NS, name)
    assert found is not None, name
    return dict(found["metadata"])


def start(cluster: harness.Cluster, tmp_path: pathlib.Path, log: str, crash_at: str | None = None) -> Any:
    return harness.OperatorProcess(
        cluster.kubeconfig(tmp_path / f"kubeconfig-{log}"),
        tmp_path / log,
        "--first-pass-limit",
        "1",
        "--log-format",
        "json",
        sidecar_port=cluster.sidecar_port,
        crash_at=crash_at,
    )


@pytest.fixture
def wide() -> Iterator[harness.Cluster]:
    yield from harness.cluster_of(4, gpus=10)


def test_restarted_operator_recovers_the_faulty_deployment_first(
    wide: harness.Cluster, tmp_path: pathlib.Path
) -> None:
    cluster = wide
    first = start(cluster, tmp_path, "op-a.log", crash_at="before:MarkedLost")
    second = None
    try:
        for name in HEALTHY:
            cluster.write("create", harness.GSD, NS, None, named(name, 1))
        # The victim last: listed after every healthy deployment, it still goes ahead of their turns.
        cluster.write("create", harness.GSD, NS, None, named(VICTIM, 2))
        cluster.wait_for(  # serving and protected: the status each loop settles on, nothing left to write
            lambda: all(settled(phase(cluster, n)) for n in [*HEALTHY, VICTIM]),
            timeout=120,
            what="every deployment serving and protected",
        )
        uids = {n: meta(cluster, harness.PODS, f"{n}-r0")["uid"] for n in HEALTHY}
        victim = cluster.get(harness.PODS, NS, f"{VICTIM}-r0")
        assert victim is not None
        cluster.fail_gpu(victim["spec"]["nodeName"], harness.gpus_of(victim)[1])
        # The first operator records the recovery (step Detected) and dies before its first sidecar step.
        assert first.killed_itself(60), first.output()[-3000:]
        assert phase(cluster, VICTIM).get("inFlight"), "no recovery recorded before the kill"
        versions = {n: meta(cluster, harness.GSD, n)["resourceVersion"] for n in HEALTHY}  # no writer now

        restarted_at = time.monotonic()
        second = start(cluster, tmp_path, "op-b.log")
        cluster.wait_for(
            lambda: (st := phase(cluster, VICTIM)).get("recoveries") == 1 and not st.get("inFlight"),
            timeout=120,
            what="victim recovered",
        )
        group = f"{NS}/{VICTIM}-r0"
        healthy_groups = {f"{NS}/{n}-r0" for n in HEALTHY}

        def first_describes() -> dict[str, float]:
            seen: dict[str, float] = {}
            for side in list(cluster.sidecars.values()):
                for rpc, request, at in list(side.calls):
                    if rpc == "DescribeGroup" and at >= restarted_at and request.group in healthy_groups:
                        seen[request.group] = min(at, seen.get(request.group, at))
            return seen

        # Every healthy deployment still gets its first pass (it asks its sidecar for its figures).
        described = cluster.wait_for(
            lambda: found if len(found := first_describes()) == len(HEALTHY) else None,
            timeout=120,
            what="every healthy first pass",
        )
        marked = sorted(
            at
            for side in cluster.sidecars.values()
            for rpc, request, at in side.calls
            if rpc == "MarkLost" and request.group == group and at >= restarted_at
        )
        assert marked, "the restarted operator never marked the lost rank"
        # The recovery started while healthy first passes were still to come.
        assert marked[0] < max(described.values())
        events = [json.loads(line) for line in second.output().splitlines() if line.startswith("{")]
        urgent = [e for e in events if e.get("event") == "first-pass-urgent"]
        assert [e["deployment"] for e in urgent] == [f"{NS}/{VICTIM}"]
        assert urgent[0]["routine_waiting"] > 0
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
    # The healthy deployments were not disturbed: same pods, still serving, their Services exist.
    for name in HEALTHY:
        found = cluster.get(harness.PODS, NS, f"{name}-r0")
        assert found is not None and found["metadata"]["uid"] == uids[name]
        assert phase(cluster, name).get("phase") == "Serving"
        assert cluster.get(harness.SERVICES, NS, name) is not None
    # ... and their first passes wrote nothing: the status they had is what they would publish.
    assert {n: meta(cluster, harness.GSD, n)["resourceVersion"] for n in HEALTHY} == versions
    last = phase(cluster, VICTIM)["lastRecovery"]
    assert (last["kind"], last["ranks"], last["outcome"]) == ("device", [1], "Succeeded")
