"""The chart lints and renders, every rendered object is valid Kubernetes (kubernetes-validate,
strict, newest schema shipped; cert-manager's Issuer/Certificate, for which it has no schema, are
checked structurally by certmanager_shape), and manifests/ equals a fresh render."""

from __future__ import annotations

import pathlib
import re
from types import ModuleType
from typing import Any

import certmanager_shape
import chart_support
import helm_python
import kubernetes_validate
import pytest
import yaml

K8S_VERSION = kubernetes_validate.utils.latest_version()


def test_helm_lint_strict_has_no_warnings() -> None:
    report = helm_python.lint(chart_support.CHART, strict=True, kube_version=f"v{K8S_VERSION}.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("variant", sorted(chart_support.VARIANTS))
def test_helm_lint_variants(variant: str) -> None:
    report = helm_python.lint(chart_support.CHART, chart_support.VARIANTS[variant], strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


def _assert_valid(objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        if obj["kind"] in certmanager_shape.KINDS:  # no offline schema: see certmanager_shape
            assert certmanager_shape.problems(obj) == [], obj
            continue
        checked = kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert checked == kubernetes_validate.utils.major_minor(K8S_VERSION), (obj["kind"], checked)


def test_default_render_is_valid_kubernetes(default_objects: list[dict[str, Any]]) -> None:
    kinds = sorted(obj["kind"] for obj in default_objects)
    assert kinds == sorted(
        ["CustomResourceDefinition", "NetworkPolicy", "NetworkPolicy", "ServiceAccount", "ServiceAccount",
         "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding",
         "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Service", "DaemonSet", "Deployment",
         "Issuer", "Issuer", "Certificate", "Certificate", "Certificate"]
    )  # fmt: skip
    _assert_valid(default_objects)


@pytest.mark.parametrize("variant", sorted(chart_support.VARIANTS))
def test_variant_render_is_valid_kubernetes(render_script: ModuleType, variant: str) -> None:
    _assert_valid(chart_support.objects(render_script.render(chart_support.VARIANTS[variant])))


def test_strict_validation_catches_a_stray_field(default_objects: list[dict[str, Any]]) -> None:
    """Control: the validator used above really rejects a wrong object, so its passes mean something."""
    deployment = next(obj for obj in default_objects if obj["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_namespaced_install_grants_namespaced_rules_only_in_those_namespaces(
    render_script: ModuleType,
) -> None:
    objs = chart_support.objects(render_script.render(chart_support.VARIANTS["namespaced"]))
    roles = {
        (o["kind"], o["metadata"].get("namespace")) for o in objs if o["kind"] in ("Role", "RoleBinding")
    }
    # The watched namespaces, plus the leader Lease's Role in the release namespace.
    namespaces = ("llm", "llm-staging", "ghostserve-system")
    assert roles == {(k, ns) for k in ("Role", "RoleBinding") for ns in namespaces}
    leader = [o for o in objs if o["kind"] == "Role" and o["metadata"]["namespace"] == "ghostserve-system"]
    assert {r for o in leader for rule in o["rules"] for r in rule["resources"]} == {"leases"}
    # Only the cluster-scoped rules stay cluster-wide (plus the users' aggregated view/edit roles and the
    # gateways' role, which the operator binds only by RoleBindings in the deployments' namespaces).
    users = ("-view", "-edit", "-gateway")
    cluster_roles = [
        o for o in objs if o["kind"] == "ClusterRole" and not o["metadata"]["name"].endswith(users)
    ]
    bound = {b["roleRef"]["name"] for b in objs if b["kind"] == "ClusterRoleBinding"}
    assert "ghostserve-gateway" not in bound
    assert len(cluster_roles) == 1
    assert {r for rule in cluster_roles[0]["rules"] for r in rule["resources"]} == {"nodes"}
    args = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert "--namespace=llm" in args and "--namespace=llm-staging" in args and "--all-namespaces" not in args


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sidecar": {"hostMemoryBudget": "64GB"}},
            "at '/sidecar/hostMemoryBudget': '64GB' does not match pattern",
        ),
        (
            {"sidecar": {"hostMemoryBuget": "64Gi"}},
            "at '/sidecar': additional properties 'hostMemoryBuget' not allowed",
        ),
        ({"sidecar": {"port": 70000}}, "at '/sidecar/port': maximum"),
        ({"operator": {"replicas": 4}}, "at '/operator/replicas': maximum"),
        ({"sidecar": {"hostMemoryBudget": "99999999999Ti"}}, "at '/sidecar/hostMemoryBudget'"),
        ({"rankPods": {"runAsUser": 0}}, "at '/rankPods/runAsUser': minimum"),
        ({"operator": {"logFormat": "xml"}}, "at '/operator/logFormat'"),
        ({"operator": {"firstPassLimit": 0}}, "at '/operator/firstPassLimit': minimum"),
    ],
)
def test_bad_values_fail_the_render_clearly(
    render_script: ModuleType, values: dict[str, Any], message: str
) -> None:
    """values.schema.json turns typos and out-of-range values into an error naming the key."""
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(message)):
        render_script.render(values)


def test_manifests_equal_a_fresh_render(render_script: ModuleType) -> None:
    committed = (chart_support.REPO / "manifests" / "ghostserve.yaml").read_text()
    fresh = render_script.manifest_text(render_script.render(), version=render_script.chart_version())
    assert committed == fresh, "manifests/ghostserve.yaml is stale: run python scripts/render_manifests.py"


def test_render_script_check_mode(render_script: ModuleType, tmp_path: pathlib.Path) -> None:
    target = tmp_path / "ghostserve.yaml"
    assert render_script.main(["--check", "--output", str(target)]) == 1  # missing counts as stale
    assert not target.exists()  # --check writes nothing
    assert render_script.main(["--output", str(target)]) == 0
    assert render_script.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text() + "# edited by hand\n")
    assert render_script.main(["--check", "--output", str(target)]) == 1
