"""What the operator writes into status fits the CRD's status schema: nothing it writes would be
pruned by the API server (an unknown field) or rejected (a wrong type or enum). Built with the
operator's own pure status functions, so a change on either side shows up here."""

from __future__ import annotations

from typing import Any

import chart_support
import crd_validator
import pytest
import yaml
from ghostserve.operator import reconcile as op_reconcile
from ghostserve.operator import status as op_status

NOW = op_reconcile.now_iso()  # the operator's own timestamps, checked against format: date-time


def _pod(node: str, *, ready: bool) -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "spec": {"nodeName": node},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {"name": "engine", "restartCount": 0, "ready": ready, "state": {"running": {}}}
            ],
        },
    }


def _operator_status(*, recovering: bool) -> dict[str, Any]:
    rows = [
        op_status.rank_row(0, rank, _pod(f"gpu-node-{rank // 4}", ready=rank != 3), name=f"m-g0-r{rank}",
                           recorded_restarts=int(rank == 3))
        for rank in range(8)
    ]  # fmt: skip
    record = {
        "kind": "device",
        "reason": "Xid79",
        "group": 0,
        "ranks": [3],
        "detectedAt": NOW,
        "step": "rebuild",
    }
    protection = op_status.protection_summary(
        enabled=True, protected_chunks=40, unprotected_chunks=2, parity_bytes=123 << 20
    )
    status = op_status.summary(
        spec_valid=True,
        rows=rows,
        recovery=record if recovering else None,
        gave_up=None,
        ever_served=True,
        protection=protection,
        old_conditions=[],
        generation=2,
        now=NOW,
    )
    last = op_status.last_recovery(
        record, outcome="Succeeded", recovered_at=NOW, seconds=1.25, bytes_rebuilt=1 << 30, chunks_rebuilt=40
    )
    status |= {"lastRecovery": last, "recoveries": 1, "recentRecoveries": [NOW]}
    if recovering:
        status["recovery"] = record
    return status


@pytest.mark.parametrize("recovering", [False, True])
def test_operator_status_fits_the_crd(validator: crd_validator.CRDValidator, recovering: bool) -> None:
    cr = yaml.safe_load((chart_support.SAMPLES / "llama-3.1-8b-tp8-xor.yaml").read_text())
    cr["status"] = _operator_status(recovering=recovering)
    assert {"phase", "conditions", "ranks", "protection", "ready"} <= set(cr["status"])
    assert validator.violations(cr) == []


def test_a_timestamp_that_is_not_rfc3339_is_reported(validator: crd_validator.CRDValidator) -> None:
    """Control: format: date-time is really checked."""
    cr = yaml.safe_load((chart_support.SAMPLES / "llama-3.1-8b-tp8-xor.yaml").read_text())
    cr["status"] = _operator_status(recovering=False)
    cr["status"]["lastRecovery"]["detectedAt"] = "23/11/2026 15:00"
    [violation] = validator.violations(cr)
    assert (violation.rule, violation.path) == ("format", "status.lastRecovery.detectedAt")


def test_a_field_the_crd_does_not_know_is_reported(validator: crd_validator.CRDValidator) -> None:
    """Control: a status field outside the schema (which the API server would prune) is caught."""
    cr = yaml.safe_load((chart_support.SAMPLES / "llama-3.1-8b-tp8-xor.yaml").read_text())
    cr["status"] = _operator_status(recovering=False) | {"lastRecoveryLog": []}
    [violation] = validator.violations(cr)
    assert (violation.rule, violation.path) == ("additionalProperties", "status")
