"""The real `ghostserve operator` process against the emulator: a rejected pod is reported (Event +
Ready=False with the API's message) and retried with backoff; objects the deployment did not create
are neither adopted nor deleted; pods are deleted with a grace period unless their node is gone; the
in-flight gauge survives a restart mid-recovery; every API call is one the chart's RBAC grants, and
every granted verb is used."""

from __future__ import annotations

import pathlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from ghostserve.operator import kube

from tests.operator import harness, opsec_support
from tests.operator.opsec_support import NS


@pytest.fixture
def recorder(cluster: harness.Cluster, monkeypatch: pytest.MonkeyPatch) -> opsec_support.Recorder:
    return opsec_support.recording(cluster, monkeypatch, leases=True)


@pytest.fixture
def operator(
    cluster: harness.Cluster,
    recorder: opsec_support.Recorder,
    tmp_path: pathlib.Path,
    request: pytest.FixtureRequest,
) -> Iterator[harness.OperatorProcess]:
    metrics = harness.free_port()
    # indirect parametrization: the gateway image (the deployment then gets a resume gateway too)
    image = getattr(request, "param", None)
    proc = opsec_support.operator(
        cluster,
        tmp_path,
        "a",
        "--metrics-port",
        str(metrics),
        "--leader-elect",
        "--leader-namespace",
        NS,
        "--leader-lease-name",
        opsec_support.LEASE,
        env_extra={"GHOSTSERVE_GATEWAY_IMAGE": image} if image else None,
    )
    proc.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    yield proc
    print(*opsec_support.stopped(proc))


def _gauge(proc: harness.OperatorProcess) -> float:
    with urllib.request.urlopen(proc.metrics_url, timeout=10) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("ghostserve_operator_recoveries_in_flight "))
    return float(line.split()[1])


def _if(condition: dict[str, Any], *, reason: str) -> dict[str, Any] | None:
    """The condition itself when it has `reason` (so a wait returns what it saw, not a later state)."""
    return condition if condition.get("reason") == reason else None


def test_rejected_pod_is_reported_then_retried_with_backoff(
    cluster: harness.Cluster, recorder: opsec_support.Recorder, operator: harness.OperatorProcess
) -> None:
    # The API server refuses the first 3 creations of the pod (as it refuses a bad env entry or a
    # request above its limit); the old operator retried once a second forever and said nothing.
    cluster.emulator.inject(422, 3, method="POST", plural="pods")
    cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
    ready = cluster.wait_for(
        lambda: _if(opsec_support.ready_condition(cluster, "llama"), reason="PodRejected"),
        timeout=60,
        what="Ready=False PodRejected",
    )
    assert ready["status"] == "False" and "injected by the test" in ready["message"]
    assert ready["observedGeneration"] == 1
    # kopf posts the Event from its own queue, after the status patch: wait for it, do not read it once.
    [event] = cluster.wait_for(
        lambda: opsec_support.events(cluster, "llama", "PodRejected"), timeout=60, what="PodRejected Event"
    )
    assert event["type"] == "Warning" and "injected by the test" in event["message"]
    cluster.wait_for(
        lambda: opsec_support.serving(cluster, "llama"), timeout=120, what="Serving after retries"
    )
    assert opsec_support.ready_condition(cluster, "llama")["status"] == "True"
    assert len(recorder.of("pods", "create", None)) >= 4  # 3 refused, then created
    assert len(opsec_support.events(cluster, "llama", "PodRejected")) == 1  # one per failure, not per retry
    posted = [str(e.get("message")) for e in opsec_support.events(cluster, "llama")]
    assert not [m for m in posted if "reconcile failed" in m]  # retries are logged, not posted as Events


def create_foreign_service(cluster: harness.Cluster) -> None:
    """A Service named like the deployment "llama" that someone other than the operator created."""
    cluster.write(
        "create",
        harness.SERVICES,
        NS,
        None,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "llama"},
            "spec": {"ports": [{"port": 80}]},
        },
    )


def test_objects_it_did_not_create_are_left_alone(
    cluster: harness.Cluster, recorder: opsec_support.Recorder, operator: harness.OperatorProcess
) -> None:
    # A Service someone else created with the deployment's name, and a pod that looks like a replica
    # of it (same labels) but belongs to nobody.
    create_foreign_service(cluster)
    service_uid = cluster.get(harness.SERVICES, NS, "llama")["metadata"]["uid"]  # type: ignore[index]
    lookalike = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "llama-r5",
            "labels": {
                "app.kubernetes.io/name": "ghostserve",
                "ghostserve.io/deployment": "llama",
                "ghostserve.io/replica": "5",
                "app.kubernetes.io/component": "engine",
            },
        },
        "spec": {"containers": [{"name": "engine", "image": "x"}]},
    }
    cluster.write("create", harness.PODS, NS, None, lookalike)
    lookalike_uid = cluster.get(harness.PODS, NS, "llama-r5")["metadata"]["uid"]  # type: ignore[index]

    cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
    cluster.wait_for(
        lambda: opsec_support.events(cluster, "llama", "NotOwned"), timeout=60, what="NotOwned reported"
    )
    [event] = opsec_support.events(cluster, "llama", "NotOwned")
    assert "Service test/llama already exists and was not created by this deployment" in event["message"]
    cluster.wait_for(lambda: opsec_support.serving(cluster, "llama"), timeout=60, what="Serving")

    cluster.write("delete", harness.GSD, NS, "llama")
    cluster.wait_for(lambda: cluster.get(harness.GSD, NS, "llama") is None, timeout=60, what="deletion")
    service = cluster.get(harness.SERVICES, NS, "llama")
    assert service is not None and service["metadata"]["uid"] == service_uid
    assert "ownerReferences" not in service["metadata"]
    pod = cluster.get(harness.PODS, NS, "llama-r5")
    assert pod is not None and pod["metadata"]["uid"] == lookalike_uid
    assert not recorder.of("services", "delete") and not recorder.of("pods", "delete", "llama-r5")


def test_a_replica_name_taken_by_a_foreign_pod_is_reported(
    cluster: harness.Cluster, recorder: opsec_support.Recorder, operator: harness.OperatorProcess
) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "qwen-r0", "labels": {"team": "other"}},
        "spec": {"containers": [{"name": "main", "image": "x"}]},
    }
    cluster.write("create", harness.PODS, NS, None, foreign)
    cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("qwen"))
    cluster.wait_for(
        lambda: opsec_support.ready_condition(cluster, "qwen").get("reason") == "NotOwned",
        timeout=60,
        what="Ready=False NotOwned",
    )
    assert "Pod test/qwen-r0 already exists" in opsec_support.ready_condition(cluster, "qwen")["message"]
    assert cluster.get(harness.PODS, NS, "qwen-r0")["metadata"]["labels"] == {"team": "other"}  # type: ignore[index]
    assert not recorder.of("pods", "delete", "qwen-r0")
    # Once the other pod is gone, the deployment proceeds by itself.
    cluster.write("delete", harness.PODS, NS, "qwen-r0")
    cluster.wait_for(lambda: opsec_support.serving(cluster, "qwen"), timeout=120, what="Serving")


def test_grace_period_unless_the_node_is_gone(
    cluster: harness.Cluster, recorder: opsec_support.Recorder, operator: harness.OperatorProcess
) -> None:
    cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
    cluster.wait_for(lambda: opsec_support.serving(cluster, "llama"), timeout=60, what="Serving")
    first = cluster.get(harness.PODS, NS, "llama-r0")
    assert first is not None

    # A node that is only NotReady may be partitioned with the container still running: graceful.
    node = first["spec"]["nodeName"]
    cluster.write(
        "update",
        harness.NODES,
        None,
        node,
        {"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
    )
    cluster.wait_for(lambda: recorder.of("pods", "delete", "llama-r0"), timeout=60, what="pod deleted")
    [graceful] = recorder.of("pods", "delete", "llama-r0")
    assert "gracePeriodSeconds" not in (graceful.body or {}), graceful.body

    def replaced() -> dict[str, Any] | None:
        found = cluster.get(harness.PODS, NS, "llama-r0")
        new = found is not None and found["metadata"]["uid"] != first["metadata"]["uid"]
        return found if new and opsec_support.serving(cluster, "llama") else None

    # A node whose object was deleted is confirmed gone: no kubelet can still run the container.
    second = cluster.wait_for(replaced, timeout=60, what="replacement serving")
    cluster.write("delete", harness.NODES, None, second["spec"]["nodeName"])
    cluster.wait_for(
        lambda: len(recorder.of("pods", "delete", "llama-r0")) >= 2, timeout=60, what="2nd delete"
    )
    forced = recorder.of("pods", "delete", "llama-r0")[1]
    assert (forced.body or {}).get("gracePeriodSeconds") == 0, forced.body
    assert (forced.body or {}).get("preconditions", {}).get("uid") == second["metadata"]["uid"]


def test_in_flight_gauge_is_zero_after_a_restart_mid_recovery(
    cluster: harness.Cluster,
    recorder: opsec_support.Recorder,
    operator: harness.OperatorProcess,
    tmp_path: pathlib.Path,
) -> None:
    cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
    cluster.wait_for(lambda: opsec_support.serving(cluster, "llama"), timeout=60, what="Serving")
    assert _gauge(operator) == 0
    cluster.nodes.auto_run = False  # the replacement stays Pending: the recovery stays in flight
    opsec_support.crash(cluster, "llama-r0")
    cluster.wait_for(
        lambda: opsec_support.status(cluster, "llama").get("inFlight"), timeout=60, what="in flight"
    )
    cluster.wait_for(lambda: _gauge(operator) == 1, timeout=30, what="gauge 1")
    operator.kill()

    metrics = harness.free_port()
    second = opsec_support.operator(
        cluster,
        tmp_path,
        "b",
        "--metrics-port",
        str(metrics),
        *opsec_support.lease_flags(lease_s="3", renew_s="2", retry_s="0.5"),
    )
    second.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    try:
        cluster.nodes.auto_run = True
        cluster.loop.call_soon_threadsafe(cluster.nodes.kick.set)  # run what the stand-in held back
        cluster.wait_for(
            lambda: (
                opsec_support.status(cluster, "llama").get("recoveries") == 1
                and not opsec_support.status(cluster, "llama").get("inFlight")
            ),
            timeout=120,
            what="recovery finished by the new operator",
        )
        cluster.wait_for(lambda: _gauge(second) == 0, timeout=30, what="gauge back to 0")
    finally:
        print(*opsec_support.stopped(second))


@pytest.mark.parametrize("operator", ["ghcr.io/ghostserve/ghostserve:test"], indirect=True)
def test_every_call_is_granted_by_the_chart_and_every_grant_is_used(
    cluster: harness.Cluster, recorder: opsec_support.Recorder, operator: harness.OperatorProcess
) -> None:
    # One deployment through create, two conflicts, a fault and deletion: every path that calls the API.
    foreign = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "llama-r0"},
        "spec": {"containers": [{"name": "main", "image": "x"}]},
    }
    cluster.write("create", harness.PODS, NS, None, foreign)
    create_foreign_service(cluster)
    cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
    cluster.wait_for(lambda: recorder.of("pods", "get", "llama-r0"), timeout=60, what="pod conflict checked")
    cluster.write("delete", harness.PODS, NS, "llama-r0")
    cluster.wait_for(lambda: opsec_support.serving(cluster, "llama"), timeout=120, what="Serving")
    cluster.write("delete", harness.SERVICES, NS, "llama")  # let the deployment create its own
    cluster.wait_for(lambda: cluster.get(harness.SERVICES, NS, "llama"), timeout=120, what="own Service")
    # A failed gateway is replaced: its own ServiceAccount and RoleBinding exist already (checked: get).
    gateway = cluster.wait_for(lambda: cluster.get(harness.PODS, NS, "llama-gateway"), timeout=60, what="gw")
    cluster.write("update", harness.PODS, NS, "llama-gateway", {"status": {"phase": "Failed"}})
    cluster.wait_for(
        lambda: recorder.of("rolebindings", "get", "llama-gateway")
        and (found := cluster.get(harness.PODS, NS, "llama-gateway")) is not None
        and found["metadata"]["uid"] != gateway["metadata"]["uid"],
        timeout=60,
        what="gateway replaced",
    )
    opsec_support.crash(cluster, "llama-r0")
    cluster.wait_for(
        lambda: opsec_support.status(cluster, "llama").get("recoveries") == 1, timeout=60, what="recovered"
    )
    cluster.write("delete", harness.GSD, NS, "llama")
    cluster.wait_for(lambda: cluster.get(harness.GSD, NS, "llama") is None, timeout=60, what="deletion")
    # The leader renews its Lease (a patch) every `retry` seconds: a run faster than that made none.
    cluster.wait_for(lambda: recorder.of("leases", "patch"), timeout=60, what="a lease renewal")

    granted = opsec_support.chart_operator_rules()
    made = {(c.group, c.resource, c.verb, c.name if c.resource == "leases" else None) for c in recorder.calls}
    # A lease create names no object in the URL: RBAC checks it without a resourceName.
    made = {(g, r, v, None if v == "create" else n) for g, r, v, n in made}
    # Creating a RoleBinding is authorized only with `bind` on the role it references (or holding all of
    # that role's permissions): each RoleBinding created is a use of `bind` on its roleRef.
    made |= {
        (kube.RBAC, "clusterroles", "bind", c.body["roleRef"]["name"])
        for c in recorder.of("rolebindings", "create")
    }
    assert made - granted == set(), "calls the chart does not grant"
    assert granted - made == set(), "granted verbs the operator never used"
    # kube.CALLS, the application's own list, is part of what the chart grants and was all exercised.
    assert {(g, r, v) for g, r, v in kube.CALLS} <= {(g, r, v) for g, r, v, _ in made}
