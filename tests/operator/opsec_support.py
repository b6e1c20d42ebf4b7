"""Shared pieces of the OPSEC operator tests: a recorder of every API request the operator makes, the
chart's operator RBAC rules, and small deployment helpers."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import kmock
from ghostserve.cluster import apiserver
from kmock._internal import enums

from tests.charts import chart_support
from tests.operator import harness

NS = "test"
REPO = pathlib.Path(__file__).resolve().parents[2]
LEASE = "ghostserve-leader"  # the chart's lease name for the default release


@dataclasses.dataclass(frozen=True)
class Call:
    group: str
    resource: str  # plural, "/status" appended for the status subresource
    verb: str
    namespace: str | None
    name: str | None
    body: Any
    status: list[int] = dataclasses.field(default_factory=list, compare=False)  # the reply's, once known


def _verb(request: Any) -> str:
    method = str(request.method.value).upper()
    if request.action == enums.action.WATCH or request.params.get("watch") in ("true", "1"):
        return "watch"
    if method == "GET":
        return "get" if request.name else "list"
    if method == "DELETE":
        return "delete" if request.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


class Recorder:
    """Every resource request the emulator serves (discovery excluded), in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def install(self, cluster: harness.Cluster, monkeypatch: Any) -> None:
        """Wrap the emulator's request handler (an attrs class with slots: patched on the class, for
        this emulator only, undone by `monkeypatch` after the test)."""
        emulator = cluster.emulator
        original = type(emulator)._handle
        recorder = self

        async def handle(this: Any, request: Any) -> Any:
            if this is not emulator or request.resource is None or not request.resource.plural:
                return await original(this, request)
            sub = f"/{request.subresource}" if request.subresource else ""
            call = Call(
                request.resource.group or "",
                request.resource.plural + sub,
                _verb(request),
                request.namespace,
                request.name,
                request.data,
            )
            recorder.calls.append(call)
            try:
                response = await original(this, request)
            except kmock.KubernetesError as exc:
                call.status.append(int(exc.status or 0))
                raise
            call.status.append(int(getattr(response, "status", 200)))
            return response

        monkeypatch.setattr(type(emulator), "_handle", handle)

    def of(self, resource: str, verb: str, name: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.resource == resource and c.verb == verb and name in (None, c.name)]

    def created(self, resource: str) -> list[str]:
        """Names of the objects really created (201), in order; refused attempts (409, 422) excluded."""
        return [str(c.body["metadata"]["name"]) for c in self.of(resource, "create") if c.status == [201]]


def declare_leases(cluster: harness.Cluster) -> None:
    """The emulator serves coordination.k8s.io Leases like any other namespaced resource."""

    async def declare() -> None:
        cluster.emulator.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
            kind="Lease",
            singular="lease",
            namespaced=True,
            verbs=["get", "create", "patch", "update", "list", "watch"],
        )

    cluster.call(declare)


LEASES = apiserver.resource("coordination.k8s.io/v1/leases")


def recording(cluster: harness.Cluster, monkeypatch: Any, *, leases: bool) -> Recorder:
    """A Recorder installed on `cluster`; with `leases`, the Lease resource declared too."""
    found = Recorder()
    found.install(cluster, monkeypatch)
    if leases:
        declare_leases(cluster)
    return found


def lease_flags(*, lease_s: str, renew_s: str, retry_s: str = "0.5") -> tuple[str, ...]:
    """Operator flags for leader election on the chart's lease in NS, with short timings for tests."""
    return (
        "--leader-elect",
        "--leader-namespace",
        NS,
        "--leader-lease-name",
        LEASE,
        "--leader-lease-seconds",
        lease_s,
        "--leader-renew-deadline-seconds",
        renew_s,
        "--leader-retry-seconds",
        retry_s,
    )
SERVICEACCOUNTS = apiserver.SERVICEACCOUNTS
ROLEBINDINGS = apiserver.ROLEBINDINGS


def chart_objects() -> list[dict[str, Any]]:
    """Every object of the default chart render (scripts/render_manifests.py)."""
    return chart_support.objects(chart_support.load_render_script().render())


def chart_operator_rules() -> set[tuple[str, str, str, str | None]]:
    """(group, resource, verb, resourceName) the default chart grants the operator's ServiceAccount:
    the rules of the roles bound to it (not the users' aggregated roles, nor the gateway's role)."""
    objects = chart_objects()
    bound = {
        (binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for binding in objects
        if binding["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(
            s.get("kind") == "ServiceAccount" and str(s.get("name")).endswith("-operator")
            for s in binding.get("subjects") or []
        )
    }
    rules: set[tuple[str, str, str, str | None]] = set()
    for obj in objects:
        if (obj["kind"], obj["metadata"]["name"]) not in bound:
            continue
        for rule in obj["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            rules.add((group, resource, verb, name))
    return rules


def deployment(name: str, *, tp: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "ghostserve.io/v1alpha1",
        "kind": "GhostServeDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "engine": {"image": "lmsysorg/sglang:v0.5.3", "tensorParallel": tp},
            "protection": {"code": "xor", "parityShards": 1},
            "recovery": {"backoffSeconds": 0},
        },
    }


def status(cluster: harness.Cluster, name: str) -> dict[str, Any]:
    return ((cluster.get(harness.GSD, NS, name) or {}).get("status")) or {}


def serving(cluster: harness.Cluster, name: str, ranks: int = 2) -> bool:
    found = status(cluster, name)
    return found.get("phase") == "Serving" and found.get("ready") == f"{ranks}/{ranks}"


def ready_condition(cluster: harness.Cluster, name: str) -> dict[str, Any]:
    return next((c for c in status(cluster, name).get("conditions") or [] if c["type"] == "Ready"), {})


def events(cluster: harness.Cluster, name: str, reason: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in cluster.list(harness.EVENTS, NS)
        if (e.get("involvedObject") or {}).get("name") == name and reason in (None, e.get("reason"))
    ]


def crash(cluster: harness.Cluster, pod: str, *, code: int = 137, reason: str = "OOMKilled") -> None:
    """The engine of `pod` exits (by default OOM-killed: a process fault)."""
    cluster.write(
        "update",
        harness.PODS,
        NS,
        pod,
        {
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "engine",
                        "restartCount": 0,
                        "ready": False,
                        "state": {"terminated": {"exitCode": code, "reason": reason}},
                    }
                ],
            }
        },
    )


def operator(
    cluster: harness.Cluster,
    workdir: pathlib.Path,
    tag: str,
    *extra: str,
    env_extra: dict[str, str] | None = None,
) -> harness.OperatorProcess:
    return harness.OperatorProcess(
        cluster.kubeconfig(workdir / f"kubeconfig-{tag}"),
        workdir / f"operator-{tag}.log",
        *extra,
        sidecar_port=cluster.sidecar_port,
        env_extra=env_extra,
    )


def stopped(*procs: harness.OperatorProcess) -> Iterator[str]:
    """Stop every process and yield the tail of its log (for failure messages)."""
    for proc in procs:
        proc.stop()
        yield proc.output()[-6000:]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
