"""Pure operator logic: specs, fault classification, remediation, phases, status (no kopf, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from ghostserve.operator import faults, phases, remediation, specs, status

BASE = {"model": {"name": "m"}, "engine": {"image": "img", "tensorParallel": 8}}


def spec(**changes: Any) -> dict[str, Any]:
    out = specs.with_defaults(BASE)
    for path, value in changes.items():
        section, key = path.split("__")
        out[section][key] = value
    return out


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"engine__tensorParallel": 0}, "engine.tensorParallel"),
        ({"protection__code": "lz4"}, "protection.code"),
        ({"protection__code": "rdp", "protection__parityShards": 1}, "must be 2 for rdp"),
        ({"protection__code": "xor", "protection__parityShards": 2}, "must be 1 for xor"),
        ({"protection__chunkTokens": 250}, "multiple of pageSize"),
        ({"recovery__faultPolicy": "node"}, "faultPolicy"),
        ({"protection__hostMemoryBudget": "lots"}, "hostMemoryBudget"),
    ],
)
def test_validate_rejects(changes: dict[str, Any], fragment: str) -> None:
    errors = specs.validate("llama", spec(**changes))
    assert any(fragment in e for e in errors), errors


def test_validate_accepts_defaults_and_rs() -> None:
    assert specs.validate("llama", spec()) == []
    assert specs.validate("llama", spec(protection__code="rs", protection__parityShards=3)) == []
    with pytest.raises(specs.SpecError):
        specs.checked("Bad_Name", BASE)


def test_rank_pod_wiring_and_avoidance() -> None:
    pod = specs.build_rank_pod(
        "ns", "llama", spec(), group=1, rank=3, avoid_nodes=["n1"], avoid_gpus=["GPU-x"]
    )
    assert pod["metadata"]["name"] == "llama-g1-r3"
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "ghostserve",
        "ghostserve.io/deployment": "llama",
        "ghostserve.io/group": "1",
        "ghostserve.io/rank": "3",
    }
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert not [a for a in args if a.startswith("--ghostserve")], "sglang rejects flags it does not know"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GHOSTSERVE_GROUP"] == "ns/llama-g1" and env["GHOSTSERVE_RANK"] == "3"
    assert env["GHOSTSERVE_WORLD_SIZE"] == "8" and env["SGLANG_PLUGINS"] == "ghostserve"
    # The SGLang plugin reads exactly these variables: its own parser must accept what the pod gets.
    from ghostserve.engine.sglang import settings as plugin_settings

    values = {k: v for k, v in env.items() if v is not None}
    parsed = plugin_settings.PluginSettings.from_env(values)
    assert parsed.enabled and parsed.group == "ns/llama-g1" and (parsed.rank, parsed.world_size) == (3, 8)
    assert parsed.sidecar == "unix:///run/ghostserve/sidecar.sock"
    assert parsed.protection.code == spec()["protection"]["code"]
    assert parsed.protection.chunk_tokens == spec()["protection"]["chunkTokens"]
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0] == {
        "key": "kubernetes.io/hostname",
        "operator": "NotIn",
        "values": ["n1"],
    }
    assert pod["metadata"]["annotations"][specs.AVOID_GPUS_ANNOTATION] == "GPU-x"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The sidecar's socket group and CPU pool directory reach the engine (chart values via operator flags).
    assert pod["spec"]["securityContext"]["supplementalGroups"] == [2000]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["ghostserve-pools"] == "/dev/shm/ghostserve" and mounts["ghostserve-pools"] == "/dev/shm"
    bare = specs.build_rank_pod(
        "ns", "llama", spec(), group=0, rank=0, node_access=specs.NodeAccess(socket_group=None, shm_dir=None)
    )
    assert "securityContext" not in bare["spec"] and len(bare["spec"]["volumes"]) == 1
    pinned = specs.build_rank_pod("ns", "llama", spec(), group=0, rank=0, pin_node="n2")
    expr = pinned["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert expr["nodeSelectorTerms"][0]["matchExpressions"][0]["operator"] == "In"


def _pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "uid": "u"}, "spec": {"nodeName": "n1"}, "status": status}


@pytest.mark.parametrize(
    ("pod", "kind", "reason"),
    [
        (_pod(phase="Running"), None, None),
        (
            _pod(
                containerStatuses=[
                    {"name": "engine", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
                ]
            ),
            "process",
            "OOMKilled",
        ),
        (
            _pod(
                containerStatuses=[
                    {"name": "engine", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}
                ]
            ),
            "process",
            "ContainerTerminated",
        ),
        (_pod(reason="Evicted", phase="Failed"), "node", "Evicted"),
        (
            _pod(
                conditions=[
                    {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
                ]
            ),
            "node",
            "DisruptionTarget",
        ),
        (
            _pod(
                phase="Running",
                containerStatuses=[{"name": "engine", "restartCount": 2, "state": {"running": {}}}],
            ),
            "process",
            "ContainerRestarted",
        ),
    ],
)
def test_classify_pod(pod: dict[str, Any], kind: str | None, reason: str | None) -> None:
    fault = faults.classify_pod(pod, known_restarts=0)
    assert (fault.kind, fault.reason) == (kind, reason) if fault else kind is None


def _node(**parts: Any) -> dict[str, Any]:
    node: dict[str, Any] = {
        "metadata": {"name": "n1"},
        "spec": {},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "capacity": {"nvidia.com/gpu": "8"},
            "allocatable": {"nvidia.com/gpu": "8"},
        },
    }
    for key, value in parts.items():
        section, field = key.split("__")
        node[section][field] = value
    return node


@pytest.mark.parametrize(
    ("node", "kind", "reason"),
    [
        (_node(), None, None),
        (_node(status__conditions=[{"type": "Ready", "status": "Unknown"}]), "node", "NodeNotReady"),
        (_node(spec__unschedulable=True), "node", "NodeCordoned"),
        (_node(spec__taints=[{"key": "nvidia.com/gpu-xid", "effect": "NoSchedule"}]), "device", "GpuTaint"),
        (_node(spec__taints=[{"key": "example.com/other", "effect": "NoSchedule"}]), None, None),
        (
            _node(
                status__conditions=[
                    {"type": "Ready", "status": "True"},
                    {"type": "GpuXidError", "status": "True"},
                ]
            ),
            "device",
            "GpuCondition",
        ),
        (_node(status__allocatable={"nvidia.com/gpu": "7"}), "device", "GpuAllocatableDropped"),
    ],
)
def test_classify_node(node: dict[str, Any], kind: str | None, reason: str | None) -> None:
    fault = faults.classify_node(node)
    assert (fault.kind, fault.reason) == (kind, reason) if fault else kind is None


def test_health_event_hits_only_the_named_gpu() -> None:
    fault = faults.classify_health({"fatal": True, "kind": "XID", "xid": 79, "gpu_index": 3, "node": "n1"})
    assert fault is not None and (fault.kind, fault.reason, fault.gpu) == ("device", "Xid", "3")
    assert faults.classify_health({"fatal": False, "kind": "XID", "gpu_index": 3}) is None
    on_gpu = {**_pod(phase="Running"), "metadata": {"annotations": {specs.GPU_ANNOTATION: "3"}}}
    other = {**_pod(phase="Running"), "metadata": {"annotations": {specs.GPU_ANNOTATION: "4"}}}
    assert faults.rank_fault(on_gpu, _node(), [fault]) == fault
    assert faults.rank_fault(other, _node(), [fault]) is None


@pytest.mark.parametrize(
    ("kind", "reason", "recent", "finished", "action"),
    [
        ("process", "OOMKilled", [], None, remediation.RESTART_IN_PLACE),
        ("device", "Xid", [], None, remediation.RESCHEDULE),
        ("node", "NodeNotReady", [], None, remediation.RESCHEDULE),
        ("process", "ContainerRestarted", [], None, remediation.RECORD_ONLY),
        ("device", "Xid", [990.0, 995.0], None, remediation.GIVE_UP),  # max 2 per hour
        ("device", "Xid", [100.0], 995.0, remediation.WAIT),  # backoff 10 s
    ],
)
def test_decide(kind: str, reason: str, recent: list[float], finished: float | None, action: str) -> None:
    decision = remediation.decide(
        faults.Fault(kind, reason, "m", node="n1"),
        recent_recoveries=recent,
        last_finished=finished,
        now=1000.0,
        max_per_hour=2,
        backoff_seconds=10,
    )
    assert decision.action == action
    if action == remediation.WAIT:
        assert decision.delay == pytest.approx(5.0)


def test_recovery_steps() -> None:
    device = faults.Fault("device", "Xid", "m", node="n1", gpu="3")
    rec = remediation.plan_recovery(
        device,
        remediation.Decision(remediation.RESCHEDULE),
        group=0,
        ranks=[2],
        old_pods={2: "u"},
        protected=True,
        detected_at="t",
        recovery_id="r",
    )
    assert (rec["preferNode"], rec["avoidGpus"], rec["avoidNodes"]) == ("n1", ["3"], [])
    seen = []
    while rec["step"] != remediation.DONE:
        rec["step"] = remediation.next_step(rec)
        seen.append(rec["step"])
    assert seen == list(remediation.STEPS[1:])
    node = faults.Fault("node", "NodeNotReady", "m", node="n1", node_wide=True)
    rec = remediation.plan_recovery(
        node,
        remediation.Decision(remediation.RESCHEDULE),
        group=0,
        ranks=[0, 1],
        old_pods={},
        protected=True,
        detected_at="t",
        recovery_id="r",
    )
    assert rec["avoidNodes"] == ["n1"] and not rec["markLost"] and not rec["rebuild"]
    assert remediation.next_step(rec) == remediation.PODS_DELETED
    assert remediation.affected_ranks([2], policy="group", world_size=4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("facts", "phase"),
    [
        ({"spec_valid": False}, phases.FAILED),
        ({"gave_up": True, "ready_ranks": 7}, phases.DEGRADED),
        ({"gave_up": True}, phases.FAILED),
        ({"recovering": True, "ready_ranks": 7}, phases.RECOVERING),
        ({"ready_ranks": 8, "scheduled_ranks": 8}, phases.SERVING),
        ({"ready_ranks": 7, "scheduled_ranks": 8, "ever_served": True}, phases.DEGRADED),
        ({"scheduled_ranks": 3}, phases.STARTING),
        ({}, phases.PENDING),
    ],
)
def test_next_phase(facts: dict[str, Any], phase: str) -> None:
    base = {
        "spec_valid": True,
        "total_ranks": 8,
        "scheduled_ranks": 0,
        "ready_ranks": 0,
        "recovering": False,
        "gave_up": False,
        "ever_served": False,
    }
    assert phases.next_phase(**{**base, **facts}) == phase


def test_status_summary_and_conditions() -> None:
    rows = [
        {
            "group": 0,
            "rank": r,
            "pod": f"p{r}",
            "node": "n",
            "gpu": "",
            "state": "Ready" if r else "Pending",
            "restarts": 0,
        }
        for r in range(2)
    ]
    prot = status.protection_summary(enabled=True, protected_chunks=3, unprotected_chunks=1, parity_bytes=9)
    assert prot["protected"] == "partial"
    out = status.summary(
        spec_valid=True,
        rows=rows,
        recovery=None,
        gave_up=None,
        ever_served=False,
        protection=prot,
        old_conditions=[],
        generation=4,
        now="T1",
    )
    assert (out["phase"], out["ready"], out["observedGeneration"]) == ("Starting", "1/2", 4)
    again = status.conditions(out["conditions"], {"Ready": ("False", "RanksNotReady", "x")}, now="T2")
    assert next(c for c in again if c["type"] == "Ready")["lastTransitionTime"] == "T1"
    moved = status.conditions(out["conditions"], {"Ready": ("True", "AllRanksReady", "x")}, now="T3")
    assert next(c for c in moved if c["type"] == "Ready")["lastTransitionTime"] == "T3"


def test_deleted_node_is_a_node_fault_only_once_seen() -> None:
    pod = _pod(phase="Running")
    fault = faults.rank_fault(pod, None, [], node_deleted=True)
    assert fault is not None and (fault.kind, fault.reason, fault.node) == ("node", "NodeDeleted", "n1")
    assert faults.rank_fault(pod, None, []) is None  # not seen yet: the node watch may lag
