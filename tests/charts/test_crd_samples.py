"""The CRD keeps to the agreed field list, its schema is structural, the samples are valid, and each
bad sample is rejected by exactly the rule written for it (OpenAPI via jsonschema, CEL via cel-python,
after the API server's defaulting)."""

from __future__ import annotations

import pathlib
from typing import Any

import chart_support
import crd_validator
import kubernetes_validate
import pytest
import yaml

# The agreed contract with the operator: path -> (type, default, minimum, maximum, enum).
AGREED: dict[str, tuple[str, Any, int | None, int | None, list[str] | None]] = {
    "model.name": ("string", None, None, None, None),
    "model.path": ("string", None, None, None, None),
    "engine.kind": ("string", "sglang", None, None, ["sglang"]),
    "engine.image": ("string", None, None, None, None),
    "engine.args": ("array", None, None, None, None),
    "engine.tensorParallel": ("integer", None, 1, 64, None),
    "engine.replicas": ("integer", 1, 1, 64, None),
    "engine.resources": ("object", None, None, None, None),
    "engine.env": ("array", None, None, None, None),
    "engine.nodeSelector": ("object", None, None, None, None),
    "engine.tolerations": ("array", None, None, None, None),
    "protection.enabled": ("boolean", True, None, None, None),
    "protection.code": ("string", "xor", None, None, ["none", "replicate", "xor", "rdp", "rs"]),
    "protection.parityShards": ("integer", 1, 1, 8, None),
    "protection.chunkTokens": ("integer", 256, 16, 65536, None),
    "protection.pageSize": ("integer", 16, 1, 4096, None),
    "protection.hostMemoryBudget": ("string", "64Gi", None, None, None),
    "protection.recompute": ("string", None, None, None, None),  # removed: declared only to be rejected
    "recovery.faultPolicy": ("string", "rank", None, None, ["rank", "group"]),
    "recovery.maxRecoveriesPerHour": ("integer", 6, 0, 1000, None),
    "recovery.backoffSeconds": ("integer", 10, 0, 3600, None),
}
REMOVED_GROUPS = {"sidecar"}  # declared (unknown fields kept) only so that a CEL rule rejects them
STATUS_FIELDS = {
    "phase", "observedGeneration", "conditions", "readyRanks", "totalRanks", "ready", "ranks", "protection",
    "recoveries", "recentRecoveries", "lastRecovery", "recovery", "kopf",
    "inFlight", "sidecarGroups", "gatewayURL",
}  # fmt: skip

# Each bad sample -> exactly the violations it must produce: (source, schema keyword or CEL message, path).
XOR_MSG = "code xor needs parityShards == 1"
TP_NODES_MSG = (
    "tensor parallelism across nodes (--nnodes/--node-rank/--dist-init-addr) is not supported: a replica's "
    "ranks run in one pod on one node, so that one sidecar holds every stripe (docs/kubernetes.md)"
)
EXPECTED_REJECTIONS: dict[str, set[tuple[str, str, str]]] = {
    "missing-model": {("schema", "required", "spec")},
    "missing-image": {("schema", "required", "spec.engine")},
    "tensor-parallel-zero": {("schema", "minimum", "spec.engine.tensorParallel")},
    "tensor-parallel-across-nodes": {("cel", TP_NODES_MSG, "spec.engine.args")},
    "replicas-not-integer": {("schema", "type", "spec.engine.replicas")},
    "unknown-engine-field": {
        ("schema", "additionalProperties", "spec.engine"),
        ("schema", "required", "spec.engine"),
    },
    "unknown-code": {("schema", "enum", "spec.protection.code")},
    "xor-two-parity": {("cel", XOR_MSG, "spec.protection.parityShards")},
    "rdp-one-parity": {("cel", "code rdp needs parityShards == 2", "spec.protection.parityShards")},
    "rs-nine-parity": {
        ("schema", "maximum", "spec.protection.parityShards"),
        ("cel", "code rs needs 1 <= parityShards <= 8", "spec.protection.parityShards"),
    },
    "chunk-not-page-multiple": {
        ("cel", "chunkTokens must be a multiple of pageSize", "spec.protection.chunkTokens")
    },
    "chunk-not-default-page-multiple": {
        ("cel", "chunkTokens must be a multiple of pageSize", "spec.protection.chunkTokens")
    },
    "memory-budget-not-quantity": {("schema", "pattern", "spec.protection.hostMemoryBudget")},
    "unknown-fault-policy": {("schema", "enum", "spec.recovery.faultPolicy")},
    "name-not-dns-label": {("cel", "metadata.name must be a DNS-1035 label of at most 55 characters", "")},
    "sidecar-socket-dir-from-cr": {
        (
            "cel",
            "spec.sidecar was removed: the sidecar's socket directory and port come from the chart "
            "(operator flags), never from a GhostServeDeployment",
            "spec.sidecar",
        )
    },
    "recompute-removed": {
        (
            "cel",
            "protection.recompute was removed: the sidecar's planner chooses rebuild or recompute per "
            "chunk by cost",
            "spec.protection.recompute",
        )
    },
    "model-path-dot-dot": {("cel", "model.path must not contain '..' segments", "spec.model.path")},
    "resources-limits-not-a-map": {("schema", "type", "spec.engine.resources.limits")},
    "resources-bad-quantity": {("schema", "pattern", "spec.engine.resources.limits.memory")},
    "env-without-name": {("schema", "required", "spec.engine.env.0")},
    "env-value-and-value-from": {
        ("cel", "an env entry takes value or valueFrom, not both", "spec.engine.env.0"),
        ("schema", "maxProperties", "spec.engine.env.0"),
    },
    "toleration-seconds-without-no-execute": {
        ("cel", "tolerationSeconds needs effect NoExecute", "spec.engine.tolerations.0")
    },
    "toleration-exists-with-value": {
        ("cel", "value must be empty when operator is Exists", "spec.engine.tolerations.0")
    },
    "toleration-equal-without-key": {
        ("cel", "operator must be Exists when key is empty", "spec.engine.tolerations.0")
    },
    "args-too-many": {("schema", "maxItems", "spec.engine.args")},
    "resource-limit-key-too-long": {
        ("cel", "resource names are at most 317 characters", "spec.engine.resources.limits")
    },
    "resource-request-key-too-long": {
        ("cel", "resource names are at most 317 characters", "spec.engine.resources.requests")
    },
    "node-selector-key-too-long": {
        ("cel", "label keys are at most 317 characters", "spec.engine.nodeSelector")
    },
}


def _load(path: pathlib.Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def _key(violation: crd_validator.Violation) -> tuple[str, str, str]:
    return (
        violation.source,
        violation.rule if violation.source == "schema" else violation.message,
        violation.path,
    )


def _spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def test_crd_identity_printer_columns_and_status(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "ghostservedeployments.ghostserve.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("ghostserve.io", "Namespaced")
    assert spec["names"]["kind"] == "GhostServeDeployment"
    assert spec["names"]["plural"] == "ghostservedeployments"
    assert spec["names"]["shortNames"] == ["gsd"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("Phase", ".status.phase"),
        ("Ready", ".status.ready"),
        ("Protected", ".status.protection.protected"),
        ("Recoveries", ".status.recoveries"),
        ("Age", ".metadata.creationTimestamp"),
    ]


def test_spec_fields_are_exactly_the_agreed_ones(crd: dict[str, Any]) -> None:
    spec = _spec_schema(crd)
    assert spec["required"] == ["model", "engine"]
    found = {
        f"{group}.{name}": node
        for group, group_node in spec["properties"].items()
        if group not in REMOVED_GROUPS
        for name, node in group_node["properties"].items()
    }
    assert set(spec["properties"]) - REMOVED_GROUPS == {"model", "engine", "protection", "recovery"}
    for group in REMOVED_GROUPS:
        assert "properties" not in spec["properties"][group]
    assert sorted(found) == sorted(AGREED)
    for path, (type_, default, minimum, maximum, enum) in AGREED.items():
        node = found[path]
        actual = tuple(node.get(key) for key in ("type", "default", "minimum", "maximum", "enum"))
        assert actual == (type_, default, minimum, maximum, enum), path
    assert spec["properties"]["model"]["required"] == ["name"]
    assert spec["properties"]["engine"]["required"] == ["image", "tensorParallel"]
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(status) == STATUS_FIELDS


def _walk(node: dict[str, Any], path: str) -> list[str]:
    """Paths of schema nodes that break the structural rules: a type everywhere, no empty objects that
    neither list properties nor keep unknown fields."""
    bad = [] if "type" in node or node.get("x-kubernetes-int-or-string") else [path]
    if node.get("type") == "object" and not (
        "properties" in node
        or "additionalProperties" in node
        or node.get("x-kubernetes-preserve-unknown-fields")
        or path == ".metadata"
    ):
        bad.append(path)
    for name, sub in node.get("properties", {}).items():
        bad += _walk(sub, f"{path}.{name}")
    if "items" in node:
        bad += _walk(node["items"], f"{path}[]")
    return bad


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema, "") == []


@pytest.mark.parametrize("sample", sorted(p.name for p in chart_support.SAMPLES.glob("*.yaml")))
def test_samples_are_valid(validator: crd_validator.CRDValidator, sample: str) -> None:
    assert validator.violations(_load(chart_support.SAMPLES / sample)) == []


def test_samples_are_the_agreed_two() -> None:
    xor = _load(chart_support.SAMPLES / "llama-3.1-8b-tp8-xor.yaml")["spec"]
    rs = _load(chart_support.SAMPLES / "llama-3.1-70b-tp8-rs2.yaml")["spec"]
    assert (xor["engine"]["tensorParallel"], xor["protection"]["code"]) == (8, "xor")
    assert (rs["engine"]["tensorParallel"], rs["protection"]["code"], rs["protection"]["parityShards"]) == (
        8,
        "rs",
        2,
    )
    assert "Llama-3.1-8B" in xor["model"]["name"] and "Llama-3.1-70B" in rs["model"]["name"]


@pytest.mark.parametrize("sample", sorted(p.name for p in chart_support.SAMPLES.glob("*.yaml")))
def test_sample_engine_fields_are_valid_kubernetes(sample: str) -> None:
    """engine.resources/env/tolerations/nodeSelector keep unknown fields in the CRD, so check them as
    what the operator puts them into: a Pod."""
    engine = _load(chart_support.SAMPLES / sample)["spec"]["engine"]
    container = {"name": "engine", "image": engine["image"], "args": engine.get("args", [])}
    container |= {key: engine[key] for key in ("resources", "env") if key in engine}
    pod_spec: dict[str, Any] = {"containers": [container]}
    pod_spec |= {key: engine[key] for key in ("nodeSelector", "tolerations") if key in engine}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "r"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, kubernetes_validate.utils.latest_version(), strict=True)


def test_minimal_spec_gets_every_default(validator: crd_validator.CRDValidator) -> None:
    minimal = {
        "apiVersion": "ghostserve.io/v1alpha1",
        "kind": "GhostServeDeployment",
        "metadata": {"name": "m"},
        "spec": {"model": {"name": "x"}, "engine": {"image": "i", "tensorParallel": 2}},
    }
    assert validator.violations(minimal) == []
    spec = crd_validator.apply_defaults(validator.schema, minimal)["spec"]
    assert spec == {
        "model": {"name": "x"},
        "engine": {"kind": "sglang", "image": "i", "tensorParallel": 2, "replicas": 1},
        "protection": {
            "enabled": True, "code": "xor", "parityShards": 1, "chunkTokens": 256, "pageSize": 16,
            "hostMemoryBudget": "64Gi",
        },
        "recovery": {"faultPolicy": "rank", "maxRecoveriesPerHour": 6, "backoffSeconds": 10},
    }  # fmt: skip
    assert "protection" not in minimal["spec"]  # defaulting worked on a copy


def test_every_bad_sample_has_an_expectation() -> None:
    assert sorted(p.stem for p in chart_support.BAD.glob("*.yaml")) == sorted(EXPECTED_REJECTIONS)


@pytest.mark.parametrize("name", sorted(EXPECTED_REJECTIONS))
def test_bad_sample_is_rejected_by_its_rule(validator: crd_validator.CRDValidator, name: str) -> None:
    violations = validator.violations(_load(chart_support.BAD / f"{name}.yaml"))
    assert {_key(v) for v in violations} == EXPECTED_REJECTIONS[name], violations


def test_every_cel_rule_is_exercised_by_a_bad_sample(validator: crd_validator.CRDValidator) -> None:
    bad_samples = [_load(p) for p in chart_support.BAD.glob("*.yaml")]
    triggered = {v.rule for cr in bad_samples for v in validator.violations(cr) if v.source == "cel"}
    assert set(validator.rules()) == triggered


@pytest.mark.parametrize(
    ("code", "shards", "ok"),
    [("xor", 1, True), ("xor", 2, False), ("rdp", 2, True), ("rdp", 1, False), ("rdp", 3, False),
     ("rs", 1, True), ("rs", 8, True), ("none", 3, True), ("replicate", 1, True)],
)  # fmt: skip
def test_parity_shards_rules_by_code(
    validator: crd_validator.CRDValidator, code: str, shards: int, ok: bool
) -> None:
    cr = _load(chart_support.SAMPLES / "llama-3.1-8b-tp8-xor.yaml")
    cr["spec"]["protection"] |= {"code": code, "parityShards": shards}
    assert (validator.violations(cr) == []) is ok


@pytest.mark.parametrize(
    ("chunk", "page", "ok"),
    [(256, 16, True), (16, 16, True), (4096, 4096, True), (48, 32, False), (272, 64, False)],
)
def test_chunk_tokens_rule(validator: crd_validator.CRDValidator, chunk: int, page: int, ok: bool) -> None:
    cr = _load(chart_support.SAMPLES / "llama-3.1-8b-tp8-xor.yaml")
    cr["spec"]["protection"] |= {"chunkTokens": chunk, "pageSize": page}
    assert (validator.violations(cr) == []) is ok


@pytest.mark.parametrize(
    ("budget", "ok"), [("64Gi", True), ("512Mi", True), ("1.5Ti", True), ("100G", True), ("64GB", False),
                       ("-1Gi", False), ("Gi", False), ("", False)],
)  # fmt: skip
def test_memory_budget_pattern(validator: crd_validator.CRDValidator, budget: str, ok: bool) -> None:
    cr = _load(chart_support.SAMPLES / "llama-3.1-8b-tp8-xor.yaml")
    cr["spec"]["protection"]["hostMemoryBudget"] = budget
    assert (validator.violations(cr) == []) is ok
