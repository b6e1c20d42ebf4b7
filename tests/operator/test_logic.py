"""Pure operator logic: specs, fault classification, remediation, phases, status (no kopf, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from ghostserve.operator import faults, phases, placement, pods, record, remediation, status

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
        ({"engine__args": ["--nnodes", "2"]}, "tensor parallelism across nodes"),
        ({"engine__args": ["--dist-init-addr=h:5000"]}, "tensor parallelism across nodes"),
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


def test_replica_pod_holds_every_rank_of_its_replica() -> None:
    pod = pods.build_replica_pod("ns", "llama", spec(), 1, pin_node="n2", avoid_nodes=["n1"])
    assert pod["metadata"]["name"] == "llama-r1"
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "ghostserve",
        "ghostserve.io/deployment": "llama",
        "ghostserve.io/replica": "1",
        "app.kubernetes.io/component": "engine",
    }
    container = pod["spec"]["containers"][0]
    args = container["args"]
    # The engine's own TP process tree: one pod, --tp-size TP, TP GPUs, no multi-node wiring.
    assert args[:4] == ["--model-path", "m", "--tp-size", "8"]
    assert not {"--nnodes", "--node-rank", "--dist-init-addr"} & set(args)
    assert not [a for a in args if a.startswith("--ghostserve")], "sglang rejects flags it does not know"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GHOSTSERVE_GROUP"] == "ns/llama-r1" and env["GHOSTSERVE_WORLD_SIZE"] == "8"
    assert "GHOSTSERVE_RANK" not in env and env["SGLANG_PLUGINS"] == "ghostserve"
    # The SGLang plugin reads exactly these variables: its own parser must accept what the pod gets.
    from ghostserve.engine.sglang import settings as plugin_settings

    parsed = plugin_settings.PluginSettings.from_env({k: v for k, v in env.items() if v is not None})
    assert parsed.enabled and parsed.group == "ns/llama-r1" and parsed.world_size == 8
    assert parsed.sidecar == "unix:///run/ghostserve/sidecar.sock"
    assert parsed.protection.code == spec()["protection"]["code"]
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]},
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n2"]},
    ]
    annotations = pod["metadata"]["annotations"]
    assert set(annotations) == {"ghostserve.io/spec-hash", "ghostserve.io/group-hash"}  # no avoid-gpus glue
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["ghostserve-pools"] == "/dev/shm/ghostserve" and mounts["ghostserve-pools"] == "/dev/shm"
    assert "affinity" not in pods.build_replica_pod("ns", "llama", spec(), 0)["spec"]


def test_spec_and_group_hashes() -> None:
    base = spec()
    assert pods.spec_hash(base) == pods.spec_hash(spec(engine__replicas=5))  # scaling rolls nothing
    assert pods.spec_hash(base) != pods.spec_hash(spec(engine__image="img2"))
    assert pods.group_hash(base) == pods.group_hash(spec(engine__image="img2"))  # KV layout unchanged
    assert pods.group_hash(base) != pods.group_hash(spec(engine__tensorParallel=4))
    assert pods.group_hash(base) != pods.group_hash(spec(protection__code="rs"))


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
