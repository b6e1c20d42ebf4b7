"""Security and least-privilege properties of the rendered chart: RBAC with named verbs only and
exactly the rules the operator needs, secure defaults on every container, the sidecar's host-memory
sizing, GPU placement, and NetworkPolicies that match the pods they guard."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import chart_support
import pytest
import yaml

# (group, resource, verb, resourceName or None). tests/operator/test_opsec_operator.py checks these against
# the calls the operator really makes; this table pins the rendered chart to them.
OPERATOR_RULES = {
    # Framework (kopf)
    ("", "events", "create", None),
    *{("ghostserve.io", "ghostservedeployments", v, None) for v in ("list", "watch", "patch")},
    # Application
    *{("", "pods", v, None) for v in ("create", "delete", "get", "list", "watch")},
    *{("", "services", v, None) for v in ("create", "delete", "get")},
    *{("", "nodes", v, None) for v in ("list", "watch")},
    ("ghostserve.io", "ghostservedeployments/status", "patch", None),
    ("coordination.k8s.io", "leases", "create", None),
    ("coordination.k8s.io", "leases", "get", "ghostserve-leader"),
    ("coordination.k8s.io", "leases", "patch", "ghostserve-leader"),
    # Application: each deployment's gateway ServiceAccount and its RoleBinding to the gateway role (bind
    # on that role alone is added per render: its name follows the release)
    *{("", "serviceaccounts", v, None) for v in ("create", "get")},
    *{("rbac.authorization.k8s.io", "rolebindings", v, None) for v in ("create", "get")},
}
# The resume gateways' ClusterRole: `ghostserve gateway --selector` lists pods, nothing else.
GATEWAY_RULES = {("", "pods", "list", None)}
USER_RULES = {
    "view": {("ghostserve.io", r, v) for r in ("ghostservedeployments", "ghostservedeployments/status")
             for v in ("get", "list", "watch")},
    "edit": {("ghostserve.io", "ghostservedeployments", v)
             for v in ("create", "update", "patch", "delete", "deletecollection")},
}  # fmt: skip


def _aggregated(role: dict[str, Any]) -> bool:
    labels = role["metadata"].get("labels") or {}
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels)


def _gateway(role: dict[str, Any]) -> bool:
    return (role["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str, str | None]]:
    return {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [None]
    }
INIT = "socket-dir-permissions"


@pytest.fixture(scope="module", params=["default", *sorted(chart_support.VARIANTS)])
def rendered(request: pytest.FixtureRequest, render_script: ModuleType) -> list[dict[str, Any]]:
    values = None if request.param == "default" else chart_support.VARIANTS[request.param]
    return chart_support.objects(render_script.render(values))


def _of_kind(objs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in kinds]


def _pod_specs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in _of_kind(objs, "Deployment", "DaemonSet")]


def test_rbac_has_no_wildcards(rendered: list[dict[str, Any]]) -> None:
    for role in _of_kind(rendered, "ClusterRole", "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
            assert all("*" not in resource for resource in rule["resources"]), rule


def test_rbac_grants_exactly_the_operator_rules(rendered: list[dict[str, Any]]) -> None:
    [gateway] = [r for r in _of_kind(rendered, "ClusterRole") if _gateway(r)]
    granted = {
        rule
        for role in _of_kind(rendered, "ClusterRole", "Role")
        if not _aggregated(role) and not _gateway(role)
        for rule in _rules(role)
    }
    bind = ("rbac.authorization.k8s.io", "clusterroles", "bind", gateway["metadata"]["name"])
    assert granted == OPERATOR_RULES | {bind}
    assert _rules(gateway) == GATEWAY_RULES
    # The operator binds it per deployment namespace; the chart binds it nowhere.
    refs = [b["roleRef"]["name"] for b in _of_kind(rendered, "ClusterRoleBinding", "RoleBinding")]
    assert gateway["metadata"]["name"] not in refs
    [operator] = [d for d in _of_kind(rendered, "Deployment")]
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GHOSTSERVE_GATEWAY_ROLE"] == gateway["metadata"]["name"]


def test_users_get_aggregated_view_and_edit_roles(default_objects: list[dict[str, Any]]) -> None:
    roles = {r["metadata"]["name"].rsplit("-", 1)[-1]: r for r in _of_kind(default_objects, "ClusterRole")}
    for kind, rules in USER_RULES.items():
        role = roles[kind]
        assert role["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{kind}"] == "true"
        granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                   for v in rule["verbs"]}  # fmt: skip
        assert granted == rules
    assert roles["edit"]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    # status is the operator's: no user role may write it
    assert not any("status" in r and v != "get" and v not in ("list", "watch")
                   for rules in USER_RULES.values() for _, r, v in rules)  # fmt: skip


def test_rbac_binds_only_the_operator_service_account(rendered: list[dict[str, Any]]) -> None:
    operator_sa = next(
        sa for sa in _of_kind(rendered, "ServiceAccount") if sa["metadata"]["name"].endswith("operator")
    )
    roles = {
        (r["kind"], r["metadata"]["name"], r["metadata"].get("namespace"))
        for r in _of_kind(rendered, "ClusterRole", "Role")
    }
    for binding in _of_kind(rendered, "ClusterRoleBinding", "RoleBinding"):
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": operator_sa["metadata"]["name"],
                "namespace": operator_sa["metadata"]["namespace"],
            }
        ]
        ref = binding["roleRef"]
        assert (
            ref["kind"],
            ref["name"],
            binding["metadata"].get("namespace") if ref["kind"] == "Role" else None,
        ) in roles


def test_rbac_rules_are_grouped_framework_then_application(render_script: ModuleType) -> None:
    for source, doc in render_script.render():
        obj = yaml.safe_load(doc)
        if obj["kind"] in ("ClusterRole", "Role") and not _aggregated(obj) and not _gateway(obj):
            framework, application = doc.find("# Framework (kopf):"), doc.find("# Application:")
            assert 0 <= framework < application, (source, doc)


def test_every_container_has_secure_defaults(rendered: list[dict[str, Any]]) -> None:
    for spec in _pod_specs(rendered):
        assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
        pod_seccomp = spec.get("securityContext", {}).get("seccompProfile", {}).get("type")
        for container in spec.get("initContainers", []) + spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, container["name"]
            assert ctx["readOnlyRootFilesystem"] is True, container["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
            assert ctx.get("privileged", False) is False
            assert (ctx.get("seccompProfile", {}).get("type") or pod_seccomp) == "RuntimeDefault"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (container["name"], kind)
            if container["name"] == INIT:
                # The one root container: it only hands the hostPath directories to the sidecar user.
                assert set(ctx["capabilities"]["add"]) <= {"CHOWN", "FOWNER"}
                assert container["command"] == ["sh", "-c"]
                assert container["args"][0].startswith("chown ") and " && chmod 2770 " in container["args"][0]
            else:
                assert ctx["runAsNonRoot"] is True, container["name"]
                assert "add" not in ctx["capabilities"], container["name"]
                assert (ctx.get("runAsUser") or spec["securityContext"]["runAsUser"]) != 0


def _sidecar(objs: list[dict[str, Any]]) -> dict[str, Any]:
    [daemonset] = _of_kind(objs, "DaemonSet")
    return daemonset


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


@pytest.mark.parametrize(
    ("budget", "overhead", "expected"),
    [
        ("64Gi", "2Gi", "67584Mi"),
        ("100Gi", "512Mi", "102912Mi"),
        ("1Ti", "0Mi", "1048576Mi"),
        ("1048577Ki", "1Gi", "2049Mi"),
    ],
)
def test_sidecar_memory_is_budget_plus_overhead(
    render_script: ModuleType, budget: str, overhead: str, expected: str
) -> None:
    objs = chart_support.objects(
        render_script.render({"sidecar": {"hostMemoryBudget": budget, "memoryOverhead": overhead}})
    )
    sidecar = _container(_sidecar(objs), "sidecar")
    assert sidecar["resources"]["requests"]["memory"] == sidecar["resources"]["limits"]["memory"] == expected
    assert f"--budget={budget}" in sidecar["args"]


def test_sidecar_runs_on_gpu_nodes_with_nvml_and_host_paths(default_objects: list[dict[str, Any]]) -> None:
    daemonset = _sidecar(default_objects)
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["automountServiceAccountToken"] is False
    sidecar = _container(daemonset, "sidecar")
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "utility" in env["NVIDIA_DRIVER_CAPABILITIES"]
    assert "nvidia.com/gpu" not in sidecar["resources"]["limits"]  # watches every GPU, takes none
    assert sidecar["args"][:2] == ["sidecar", "--socket=/run/ghostserve/sidecar.sock"]
    grpc = next(p for p in sidecar["ports"] if p["name"] == "grpc")
    assert grpc["containerPort"] == grpc["hostPort"] == 7443
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["socket-dir"]["hostPath"] == {"path": "/run/ghostserve", "type": "DirectoryOrCreate"}
    assert volumes["shm"]["hostPath"] == {"path": "/dev/shm/ghostserve", "type": "DirectoryOrCreate"}
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts["socket-dir"] == "/run/ghostserve" and mounts["shm"] == "/dev/shm"
    init = spec["initContainers"][0]
    assert "65533:2000 /mnt/socket /mnt/shm" in init["args"][0]
    for probe in ("livenessProbe", "readinessProbe"):
        command = sidecar[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and "unix:///run/ghostserve/sidecar.sock" in command[2]


def test_operator_probes_and_arguments(default_objects: list[dict[str, Any]]) -> None:
    [deployment] = _of_kind(default_objects, "Deployment")
    # Two replicas are safe because only the Lease holder acts (leader election on).
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    operator = _container(deployment, "operator")
    for arg in ("--leader-elect", "--leader-lease-name=ghostserve-leader", "--sidecar-port=7443",
                "--sidecar-socket-dir=/run/ghostserve", "--sidecar-shm-dir=/dev/shm/ghostserve",
                "--rank-run-as-user=65532"):  # fmt: skip
        assert arg in operator["args"], arg
    assert "--allow-root-ranks" not in operator["args"]
    assert operator["command"] == ["ghostserve"] and operator["args"][0] == "operator"
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in operator["args"]
    assert f"--metrics-port={ports['metrics']}" in operator["args"]
    assert (
        "--all-namespaces" in operator["args"]
        and "--sidecar-address-template={node_ip}:{port}" in operator["args"]
    )
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_network_policies_guard_the_right_pods(default_objects: list[dict[str, Any]]) -> None:
    pods = {
        o["kind"]: o["spec"]["template"]["metadata"]["labels"]
        for o in _of_kind(default_objects, "Deployment", "DaemonSet")
    }
    policies = {
        p["metadata"]["name"].rsplit("-", 1)[-1]: p["spec"]
        for p in _of_kind(default_objects, "NetworkPolicy")
    }
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}

    sidecar = policies["sidecar"]
    assert _labels_match(sidecar["podSelector"]["matchLabels"], pods["DaemonSet"])
    assert not _labels_match(sidecar["podSelector"]["matchLabels"], pods["Deployment"])
    grpc_rule, metrics_rule = sidecar["ingress"]
    assert grpc_rule["ports"] == [{"protocol": "TCP", "port": 7443}]
    # The operator, and other sidecars: a move streams a group from one node's sidecar to another's.
    operator_peer, sidecar_peer = grpc_rule["from"]
    assert set(operator_peer) == set(sidecar_peer) == {"podSelector"}
    operator_match = operator_peer["podSelector"]["matchLabels"]
    sidecar_match = sidecar_peer["podSelector"]["matchLabels"]
    assert _labels_match(operator_match, pods["Deployment"])
    assert not _labels_match(operator_match, pods["DaemonSet"])
    assert _labels_match(sidecar_match, pods["DaemonSet"])
    assert not _labels_match(sidecar_match, pods["Deployment"])
    assert metrics_rule == {"from": [monitoring], "ports": [{"protocol": "TCP", "port": 9464}]}

    operator = policies["operator"]
    assert _labels_match(operator["podSelector"]["matchLabels"], pods["Deployment"])
    assert operator["ingress"] == [{"from": [monitoring], "ports": [{"protocol": "TCP", "port": 9090}]}]


def test_metrics_services_select_their_pods(default_objects: list[dict[str, Any]]) -> None:
    pods = [o["spec"]["template"] for o in _of_kind(default_objects, "Deployment", "DaemonSet")]
    for service in _of_kind(default_objects, "Service"):
        [target] = [p for p in pods if _labels_match(service["spec"]["selector"], p["metadata"]["labels"])]
        [port] = service["spec"]["ports"]
        assert port["targetPort"] in {p["name"] for c in target["spec"]["containers"] for p in c["ports"]}
