"""The operator and the chart's CRD agree: same defaults, and nothing the operator writes is pruned."""

from __future__ import annotations

import pathlib
from typing import Any

import jsonschema
import yaml
from ghostserve.operator import faults, pods, reconcile, record, remediation, specs, status

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
        if "properties" not in spec_schema.get(section, {}):
            continue  # a section the CRD rejects (spec.sidecar: chart-owned); its defaults are internal
        for key, value in defaults.items():
            declared = spec_schema[section]["properties"][key]
            if "default" in declared:
                assert declared["default"] == value, f"{section}.{key}"


def test_status_the_operator_writes_is_valid_and_kept() -> None:
    status_schema = schema()["properties"]["status"]
    rec = remediation.plan(
        [(1, faults.Fault("device", "Xid", "GPU 3: Xid 79", node="n1", gpu="GPU-3", gpu_index="3"))],
        remediation.Decision(remediation.RESCHEDULE),
        replica=0,
        old_uid="uid",
        node="n1",
        protected=True,
        policy="rank",
        detected_at=reconcile.now_iso(),
        recovery_id="abc",
    )
    rows = [
        status.rank_row(0, r, None, name=pods.replica_pod_name("x", 0), recorded_restarts=0, gpu=f"GPU-{r}")
        for r in range(2)
    ]
    out = status.summary(
        spec_valid=True,
        rows=rows,
        recovery=None,
        in_flight=[{"replica": 0, "kind": rec.kind, "reason": rec.reason, "step": rec.step}],
        gave_up=None,
        ever_served=True,
        protection=status.protection_summary(
            enabled=True, protected_chunks=1, unprotected_chunks=0, parity_bytes=9, known=False
        ),
        old_conditions=[],
        generation=3,
        now=reconcile.now_iso(),
        problem=("ReplacementUnschedulable", "no node has 2 healthy free GPUs"),
    )
    out["inFlight"] = [rec.to_dict()]
    out["sidecarGroups"] = [{"replica": 0, "node": "n1", "hash": "abc"}]
    out["recoveries"] = 1
    out["recentRecoveries"] = [rec.detected_at]
    rec.target, rec.bytes_moved = "n2", 4096
    outcome, kv, message = record.outcome(rec)
    out["lastRecovery"] = status.last_recovery(
        {"kind": rec.kind, "reason": rec.reason, "group": 0, "ranks": rec.lost_ranks}
        | {"detectedAt": rec.detected_at},
        outcome=outcome,
        recovered_at=reconcile.now_iso(),
        seconds=1.5,
        bytes_rebuilt=10,
        chunks_rebuilt=2,
        chunks_recomputed=1,
        bytes_moved=rec.bytes_moved,
        kv=kv,
        message=message,
        source=rec.source,
        target=rec.target,
    )
    for degraded in ("Degraded", "Failed"):
        jsonschema.validate(
            {**out, "lastRecovery": {**out["lastRecovery"], "outcome": degraded}},
            status_schema,
            format_checker=jsonschema.FormatChecker(),
        )
    assert pruned(out, status_schema) == []


def test_invalid_specs_the_operator_rejects_have_crd_rules_too() -> None:
    spec_schema = schema()["properties"]["spec"]
    engine = spec_schema["properties"]["engine"]["properties"]
    assert engine["tensorParallel"]["minimum"] == 1 and engine["tensorParallel"]["maximum"] == 64
    assert spec_schema["properties"]["protection"]["properties"]["code"]["enum"] == list(specs.CODES)
