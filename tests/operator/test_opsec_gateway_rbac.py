"""The resume gateway's API identity: its own ServiceAccount per deployment, bound in the deployment's
namespace to the chart's gateway ClusterRole, which grants exactly what the real gateway calls. Real
operator and real `ghostserve gateway` processes against the API emulator (which enforces no RBAC:
the calls are recorded and compared with the rendered chart's rules)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.operator import harness, opsec_support
from tests.operator.opsec_support import NS

IMAGE = "ghcr.io/ghostserve/ghostserve:test"
ROLE = "ghostserve-gateway"  # the default release's gateway ClusterRole (templates/rbac.yaml)
SERVICEACCOUNTS = opsec_support.SERVICEACCOUNTS
ROLEBINDINGS = opsec_support.ROLEBINDINGS


@pytest.fixture
def recorder(cluster: harness.Cluster, monkeypatch: pytest.MonkeyPatch) -> opsec_support.Recorder:
    return opsec_support.recording(cluster, monkeypatch, leases=False)


@pytest.fixture
def operator(
    cluster: harness.Cluster, recorder: opsec_support.Recorder, tmp_path: pathlib.Path
) -> Iterator[harness.OperatorProcess]:
    proc = harness.OperatorProcess(
        cluster.kubeconfig(tmp_path / "kubeconfig-op"),
        tmp_path / "operator.log",
        sidecar_port=cluster.sidecar_port,
        env_extra={"GHOSTSERVE_GATEWAY_IMAGE": IMAGE},
    )
    yield proc
    print(*opsec_support.stopped(proc))


def _chart_gateway_rules() -> set[tuple[str, str, str]]:
    [role] = [
        obj
        for obj in opsec_support.chart_objects()
        if obj["kind"] == "ClusterRole" and obj["metadata"]["name"] == ROLE
    ]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _owned_by(obj: dict[str, Any] | None, uid: str) -> bool:
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def test_gateway_runs_as_its_own_account_with_only_pods_list(
    cluster: harness.Cluster,
    recorder: opsec_support.Recorder,
    operator: harness.OperatorProcess,
    tmp_path: pathlib.Path,
) -> None:
    cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
    gateway = cluster.wait_for(
        lambda: cluster.get(harness.PODS, NS, "llama-gateway"), timeout=60, what="gateway pod"
    )
    uid = cluster.get(harness.GSD, NS, "llama")["metadata"]["uid"]  # type: ignore[index]
    # Not the namespace's default account: its own, owned by the deployment, bound to the gateway role.
    assert gateway["spec"]["serviceAccountName"] == "llama-gateway"
    account = cluster.get(SERVICEACCOUNTS, NS, "llama-gateway")
    binding = cluster.get(ROLEBINDINGS, NS, "llama-gateway")
    assert _owned_by(account, uid) and _owned_by(binding, uid)
    assert binding is not None and binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": ROLE,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llama-gateway", "namespace": NS}]
    # The account existed before the pod that names it was created (else admission refuses the pod).
    order = [(c.resource, c.verb) for c in recorder.calls if c.verb == "create"]
    assert order.index(("serviceaccounts", "create")) < order.index(("rolebindings", "create"))
    assert order.index(("rolebindings", "create")) < max(i for i, c in enumerate(order) if c[0] == "pods")

    # The real gateway, run with the pod's own arguments: every call it makes is granted by the role,
    # and the role grants nothing it does not call.
    args = gateway["spec"]["containers"][0]["args"]
    port = harness.free_port()
    args[args.index("--listen") + 1] = f"127.0.0.1:{port}"
    operator.stop()  # from here on, every API call the emulator serves is the gateway's
    before = len(recorder.calls)
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig(tmp_path / "kubeconfig-gw")))
    log = (tmp_path / "gateway.log").open("wb")
    argv = [sys.executable, "-m", "ghostserve.cli.main", *args]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    try:
        # /health asks the backend pool, which lists the selector's pods through the API.
        cluster.wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=60, what="gateway up")
        cluster.wait_for(
            lambda: [c for c in recorder.calls[before:] if c.resource == "pods" and c.verb == "list"],
            timeout=60,
            what="the gateway listing its pods",
        )
    except Exception:
        print((tmp_path / "gateway.log").read_text()[-4000:])
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    gateway_calls = {(c.group, c.resource, c.verb) for c in recorder.calls[before:]}
    assert {c.namespace for c in recorder.calls[before:]} == {NS}
    assert gateway_calls == _chart_gateway_rules() == {("", "pods", "list")}


def test_an_account_it_did_not_create_is_reported_and_left_alone(
    cluster: harness.Cluster, recorder: opsec_support.Recorder, operator: harness.OperatorProcess
) -> None:
    foreign = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "llama-gateway"}}
    cluster.write("create", SERVICEACCOUNTS, NS, None, foreign)
    cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
    cluster.wait_for(
        lambda: opsec_support.events(cluster, "llama", "NotOwned"), timeout=60, what="NotOwned Event"
    )
    [event] = opsec_support.events(cluster, "llama", "NotOwned")
    assert "ServiceAccount test/llama-gateway" in event["message"]
    account = cluster.get(SERVICEACCOUNTS, NS, "llama-gateway")
    assert account is not None and not account["metadata"].get("ownerReferences")
    # Nothing was bound to the foreign account, and no gateway pod runs as it.
    assert cluster.get(ROLEBINDINGS, NS, "llama-gateway") is None
    assert not recorder.of("rolebindings", "create")
    assert cluster.get(harness.PODS, NS, "llama-gateway") is None


def test_the_chart_binds_the_gateway_role_nowhere_and_lets_the_operator_bind_only_it() -> None:
    objects = opsec_support.chart_objects()
    bindings = [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert not [b for b in bindings if b["roleRef"]["name"] == ROLE]  # the operator binds it per namespace
    binds = {
        (tuple(rule.get("resourceNames") or ()), tuple(rule["resources"]))
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
        for rule in o["rules"]
        if "bind" in rule["verbs"] or "escalate" in rule["verbs"] or "*" in rule["verbs"]
    }
    assert binds == {((ROLE,), ("clusterroles",))}
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for c in containers for e in c["env"]}
    assert env["GHOSTSERVE_GATEWAY_ROLE"] == ROLE


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError:
        return True  # 503 until a backend is healthy: it is up
    except OSError:
        return False
    return True
