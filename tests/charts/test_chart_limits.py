"""The chart's limits: release names up to Helm's 53 characters give valid object names, values that
would clash or overflow fail the render with a clear message, and the CRD caps every string, list and
map of the spec (the same caps as the operator's own checks) so the worst-case spec fits kopf's
annotation."""

from __future__ import annotations

import json
import re
from types import ModuleType
from typing import Any

import chart_support
import helm_python
import pytest
from ghostserve.operator import specchecks

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ANNOTATIONS_LIMIT = 256 * 1024  # the API server's limit on all annotations of one object together

RELEASES = [
    "r" * 53,  # the longest release Helm accepts, without the chart name: "<release>-ghostserve"
    "ghostserve-" + "x" * 42,  # contains the chart name: used as is
    "a" * 36 + "-" + "b" * 16,  # 37+ characters broke the metrics Service names before
    "x" * 44 + "-" + "y" * 8,  # truncation lands right after a dash
]


def _names(objs: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    return [(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objs]


@pytest.mark.parametrize("release", RELEASES)
def test_long_release_names_render_valid_unique_names(render_script: ModuleType, release: str) -> None:
    assert len(release) <= 53
    objs = chart_support.objects(render_script.render(release=release))
    names = _names(objs)
    assert len(set(names)) == len(names)
    for kind, name, _ in names:
        if kind == "CustomResourceDefinition":
            continue
        assert len(name) <= 63 and DNS_LABEL.match(name), (kind, name)
        if kind == "Service":
            assert DNS_1035.match(name), name
    # Every reference between objects still points at an object of the render.
    accounts = {name for kind, name, _ in names if kind == "ServiceAccount"}
    for obj in objs:
        if obj["kind"] in ("Deployment", "DaemonSet"):
            assert obj["spec"]["template"]["spec"]["serviceAccountName"] in accounts
        if obj["kind"].endswith("Binding"):
            assert (obj["roleRef"]["kind"], obj["roleRef"]["name"]) in {(k, n) for k, n, _ in names}
            assert all(s["name"] in accounts for s in obj["subjects"])


def test_release_name_starting_with_a_digit_fails_clearly(render_script: ModuleType) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="must start with a lowercase letter"):
        render_script.render(release="9llama")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator": {"healthPort": 9090, "metricsPort": 9090}}, "operator.healthPort and operator.metr"),
        ({"sidecar": {"port": 9464, "metricsPort": 9464}}, "sidecar.port and sidecar.metricsPort are both"),
        ({"sidecar": {"hostMemoryBudget": "999999999Ti"}}, "above 64Ti"),
        ({"sidecar": {"hostMemoryBudget": "64Ti", "memoryOverhead": "1Gi"}}, "above 64Ti"),
        ({"sidecar": {"socketDir": "/"}}, 'sidecar.socketDir "/"'),
        ({"sidecar": {"shmDir": "/dev/shm/../etc"}}, "sidecar.shmDir"),
        ({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}}, "needs operator.leaderElec"),
        ({"rankPods": {"runAsUser": 42}, "sidecar": {"runAsUser": 42}}, "are both 42: the sidecar treats"),
        (
            {"operator": {"leaderElection": {"leaseSeconds": 10, "renewDeadlineSeconds": 10}}},
            "retrySeconds < renewDeadlineSeconds < leaseSeconds",
        ),
    ],
)
def test_clashing_or_overflowing_values_fail_clearly(
    render_script: ModuleType, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render_script.render(values)


def test_one_replica_without_leader_election_uses_recreate(render_script: ModuleType) -> None:
    objs = chart_support.objects(
        render_script.render({"operator": {"replicas": 1, "leaderElection": {"enabled": False}}})
    )
    [deployment] = [o for o in objs if o["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [o for o in objs if o["kind"] == "Role" and o["metadata"]["name"].endswith("-leader")]


# ---- CRD caps ------------------------------------------------------------------------------------


def _spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    node: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return node


def _uncapped(node: dict[str, Any], path: str) -> list[str]:
    """Schema paths under spec that accept an unbounded string, list or map."""
    bad: list[str] = []
    kind = node.get("type")
    if node.get("x-kubernetes-preserve-unknown-fields") and path != ".sidecar":
        bad.append(f"{path} keeps unknown fields")
    stringy = kind == "string" or node.get("x-kubernetes-int-or-string")
    if stringy and "enum" not in node and "maxLength" not in node:
        bad.append(f"{path} has no maxLength")
    if kind == "array" and "maxItems" not in node:
        bad.append(f"{path} has no maxItems")
    if kind == "object" and "additionalProperties" in node:
        if "maxProperties" not in node:
            bad.append(f"{path} has no maxProperties")
        if not any("size(k) <=" in r["rule"] for r in node.get("x-kubernetes-validations") or []):
            bad.append(f"{path} does not cap its keys")
    for name, sub in (node.get("properties") or {}).items():
        bad += _uncapped(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        bad += _uncapped(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        bad += _uncapped(node["items"], f"{path}[]")
    return bad


def test_every_spec_string_list_and_map_is_capped(crd: dict[str, Any]) -> None:
    assert _uncapped(_spec_schema(crd), "") == []


def _largest(node: dict[str, Any]) -> Any:
    """The largest value the schema admits (every string, list and map at its cap)."""
    kind = node.get("type")
    if node.get("x-kubernetes-int-or-string") or kind == "string":
        return "x" * int(node.get("maxLength", 0)) if "enum" not in node else max(node["enum"], key=len)
    if kind == "array":
        return [_largest(node["items"]) for _ in range(int(node["maxItems"]))]
    if kind == "object":
        out = {name: _largest(sub) for name, sub in (node.get("properties") or {}).items()}
        if "maxProperties" in node and node.get("properties"):  # only the largest N fields at once
            biggest = sorted(out, key=lambda k: len(json.dumps(out[k])), reverse=True)
            out = {k: out[k] for k in biggest[: int(node["maxProperties"])]}
        if isinstance(node.get("additionalProperties"), dict):
            extra = _largest(node["additionalProperties"])
            out.update({f"{i:03d}".ljust(317, "k"): extra for i in range(int(node["maxProperties"]))})
        return out
    return 2**63 - 1 if kind == "integer" else True


def test_worst_case_spec_fits_kopfs_annotation(crd: dict[str, Any]) -> None:
    """kopf stores the whole spec in its last-handled-configuration annotation (all annotations of an
    object share 256 KiB). The largest spec the CRD admits must fit kopf's copy even with every
    character JSON-escaped as two, and kopf's copy plus kubectl's client-side last-applied copy."""
    spec = _largest(_spec_schema(crd))
    size = len(json.dumps(spec, separators=(",", ":")))
    assert 2 * size < ANNOTATIONS_LIMIT - 16 * 1024, size  # 16 KiB left for the user's own annotations


def test_crd_caps_equal_the_operator_checks(crd: dict[str, Any]) -> None:
    spec = _spec_schema(crd)["properties"]
    engine = spec["engine"]["properties"]
    env = engine["env"]["items"]["properties"]
    assert (engine["args"]["maxItems"], engine["args"]["items"]["maxLength"]) == (
        specchecks.MAX_ARGS,
        specchecks.MAX_ARG_LENGTH,
    )
    assert (engine["env"]["maxItems"], env["name"]["maxLength"], env["value"]["maxLength"]) == (
        specchecks.MAX_ENV,
        specchecks.MAX_ENV_NAME,
        specchecks.MAX_ENV_VALUE,
    )
    assert env["name"]["pattern"] == specchecks.ENV_NAME.pattern
    for part in ("limits", "requests"):
        assert engine["resources"]["properties"][part]["maxProperties"] == specchecks.MAX_RESOURCES
    assert engine["nodeSelector"]["maxProperties"] == specchecks.MAX_NODE_SELECTOR
    assert engine["tolerations"]["maxItems"] == specchecks.MAX_TOLERATIONS
    assert engine["image"]["maxLength"] == specchecks.MAX_IMAGE
    assert spec["model"]["properties"]["name"]["maxLength"] == specchecks.MAX_MODEL_NAME
    assert spec["model"]["properties"]["path"]["maxLength"] == specchecks.MAX_PATH
