"""The operator and the chart's CRD agree: same defaults, and nothing the operator writes is pruned."""

from __future__ import annotations

import pathlib
from typing import Any

import jsonschema
import yaml
from ghostserve.operator import faults, reconcile, remediation, specs, status

CRD = (
    pathlib.Path(__file__).resolve().parents[2]
    / "charts/ghostserve/crds/ghostservedeployments.ghostserve.io.yaml"
)


def schema() -> dict[str, Any]:
    # A missing CRD is a moved or deleted chart file, not a reason to skip the contract.
    assert CRD.exists(), f"the chart's CRD is not at {CRD}"
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == specs.VERSION)
    found: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return found


def pruned(value: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """Paths an API server would drop from `value` (fields the structural schema does not declare)."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        props = node.get("properties") or {}
        out = [f"{path}.{k}" for k in value if k not in props]
        return out + [p for k, v in value.items() if k in props for p in pruned(v, props[k], f"{path}.{k}")]
    if isinstance(value, list) and "items" in node:
        return [p for i, v in enumerate(value) for p in pruned(v, node["items"], f"{path}[{i}]")]
    return []


def test_defaults_match_the_crd() -> None:
    spec_schema = schema()["properties"]["spec"]["properties"]
    for section, defaults in specs.DEFAULTS.items():
        for key, value in defaults.items():
            declared = spec_schema[section]["properties"][key]
            if "default" in declared:
                assert declared["default"] == value, f"{section}.{key}"


def test_status_the_operator_writes_is_valid_and_kept() -> None:
    status_schema = schema()["properties"]["status"]
    fault = faults.Fault("device", "Xid", "GPU 3: Xid 79", node="n1", gpu="GPU-3", gpu_index="3")
    record = remediation.plan_recovery(
        fault,
        remediation.Decision(remediation.RESCHEDULE),
        group=0,
        ranks=[1],
        old_pods={1: "uid"},
        protected=True,
        detected_at=reconcile.now_iso(),
        recovery_id="abc",
    )
    rows = [
        status.rank_row(0, r, None, name=specs.rank_pod_name("x", 0, r), recorded_restarts=0)
        for r in range(2)
    ]
    out = status.summary(
        spec_valid=True,
        rows=rows,
        recovery=record,
        gave_up=None,
        ever_served=True,
        protection=status.protection_summary(
            enabled=True, protected_chunks=1, unprotected_chunks=0, parity_bytes=9
        ),
        old_conditions=[],
        generation=3,
        now=reconcile.now_iso(),
    )
    out["recovery"] = record
    out["recoveries"] = 1
    out["recentRecoveries"] = [record["detectedAt"]]
    out["lastRecovery"] = status.last_recovery(
        record,
        outcome="Succeeded",
        recovered_at=reconcile.now_iso(),
        seconds=1.5,
        bytes_rebuilt=10,
        chunks_rebuilt=2,
        chunks_recomputed=1,
    )
    jsonschema.validate(out, status_schema, format_checker=jsonschema.FormatChecker())
    assert pruned(out, status_schema) == []


def test_invalid_specs_the_operator_rejects_have_crd_rules_too() -> None:
    spec_schema = schema()["properties"]["spec"]
    engine = spec_schema["properties"]["engine"]["properties"]
    assert engine["tensorParallel"]["minimum"] == 1 and engine["tensorParallel"]["maximum"] == 64
    assert spec_schema["properties"]["protection"]["properties"]["code"]["enum"] == list(specs.CODES)
