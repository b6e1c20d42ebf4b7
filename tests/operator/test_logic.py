"""Pure operator logic: specs, fault classification, remediation, phases, status (no kopf, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from ghostserve.operator import faults, phases, placement, pods, record, remediation, specs, status

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
        # GPU signals are not node faults: they hit one rank (node_gpu_faults), never the node.
        (_node(spec__taints=[{"key": "nvidia.com/gpu-xid", "effect": "NoSchedule"}]), None, None),
        (_node(status__allocatable={"nvidia.com/gpu": "7"}), None, None),
    ],
)
def test_classify_node(node: dict[str, Any], kind: str | None, reason: str | None) -> None:
    fault = faults.classify_node(node)
    assert (fault.kind, fault.reason) == (kind, reason) if fault else kind is None


UUID = "GPU-4e0c6f0e-8a3b-11ee-b9d1-0242ac120002"


def _running_pod(node: str = "n1") -> dict[str, Any]:
    meta = {"name": "llama-r0", "uid": "u"}
    return {"metadata": meta, "spec": {"nodeName": node}, "status": {"phase": "Running"}}


def test_a_gpu_signal_hits_exactly_the_rank_holding_that_gpu() -> None:
    group = "ns/llama-r0"
    stamped = faults.classify_health(
        {"fatal": True, "kind": "XID", "xid": 79, "gpu_index": 3, "gpu_uuid": UUID, "group": group, "rank": 2}
    )
    assert stamped is not None and (stamped.kind, stamped.gpu, stamped.group, stamped.rank) == (
        "device",
        UUID,
        group,
        2,
    )
    assert faults.classify_health({"fatal": False, "kind": "XID", "gpu_index": 3}) is None
    found = faults.replica_faults(_running_pod(), _node(), [stamped], group=group, uuid_ranks={})
    assert [(r, f.reason) for r, f in found] == [(2, "Xid")]
    # Another replica's group on the same node: not this replica.
    assert faults.replica_faults(_running_pod(), _node(), [stamped], group="ns/llama-r1", uuid_ranks={}) == []
    # No group from the sidecar and a UUID no rank attached with: ignored, never "GPU 0" or every rank.
    unknown = faults.classify_health({"fatal": True, "kind": "XID", "gpu_index": 0, "gpu_uuid": "GPU-x"})
    assert unknown is not None and unknown.group is None and unknown.rank is None
    assert faults.replica_faults(_running_pod(), _node(), [unknown], group=group, uuid_ranks={UUID: 1}) == []
    # ... but a UUID the group's ranks attached with (DescribeGroup) is that rank.
    by_uuid = faults.classify_health({"fatal": True, "kind": "GPU_LOST", "gpu_uuid": UUID})
    assert by_uuid is not None
    found = faults.replica_faults(_running_pod(), _node(), [by_uuid], group=group, uuid_ranks={UUID: 1})
    assert [(r, f.reason) for r, f in found] == [(1, "GpuLost")]


def test_node_gpu_taints_and_conditions_hit_the_named_gpu_only() -> None:
    named = _node(
        status__conditions=[
            {"type": "Ready", "status": "True"},
            {"type": "GpuXidError", "status": "True", "message": f"Xid 79 on {UUID}"},
        ]
    )
    [fault] = faults.node_gpu_faults(named)
    assert (fault.kind, fault.reason, fault.gpu) == ("device", "GpuCondition", UUID)
    found = faults.replica_faults(_running_pod(), named, [], group="g", uuid_ranks={UUID: 3})
    assert [(r, f.reason) for r, f in found] == [(3, "GpuCondition")]
    vague = _node(spec__taints=[{"key": "nvidia.com/gpu-unhealthy", "effect": "NoSchedule"}])
    [fault] = faults.node_gpu_faults(vague)
    assert fault.gpu is None  # reported by the operator, attributed to nobody
    assert faults.replica_faults(_running_pod(), vague, [], group="g", uuid_ranks={UUID: 3}) == []


def test_deleted_node_is_a_node_fault_only_once_seen() -> None:
    found = faults.replica_faults(_running_pod(), None, [], group="g", uuid_ranks={}, node_deleted=True)
    assert [(r, f.kind, f.reason) for r, f in found] == [(None, "node", "NodeDeleted")]
    assert faults.replica_faults(_running_pod(), None, [], group="g", uuid_ranks={}) == []


def _gpu_node(name: str, gpus: int, *, allocatable: int | None = None, **spec_: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": dict(spec_),
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "capacity": {"nvidia.com/gpu": str(gpus)},
            "allocatable": {"nvidia.com/gpu": str(gpus if allocatable is None else allocatable)},
        },
    }


def test_placement_same_node_else_another_else_none() -> None:
    tp4 = spec(engine__tensorParallel=4)
    nodes = {"a": _gpu_node("a", 8, allocatable=7), "b": _gpu_node("b", 4), "c": _gpu_node("c", 8)}
    # The failed pod's GPUs are free again; 7 healthy - 0 used >= 4: the swap stays on the same node.
    same = placement.choose(nodes, {}, tp4, source="a")
    assert (same.node, same.same_node) == ("a", True)
    # 7 healthy but 4 used by another replica: elsewhere, the node with most free GPUs.
    other = placement.choose(nodes, {"a": 4, "c": 2}, tp4, source="a")
    assert (other.node, other.same_node) == ("c", False)
    # The plugin has not lowered allocatable yet: GPUs the operator knows are bad still count out.
    lagging = {"a": _gpu_node("a", 4), "b": _gpu_node("b", 4)}
    assert placement.choose(lagging, {}, tp4, source="a", bad_gpus={"a": 1}).node == "b"
    cordoned = {"a": _gpu_node("a", 8, unschedulable=True), "b": _gpu_node("b", 2)}
    none = placement.choose(cordoned, {}, tp4, source="a")
    assert none.node is None and "never spans nodes" in none.reason and "cordoned" in none.reason
    tolerated = spec(engine__tensorParallel=4, engine__tolerations=[{"key": "gpu", "operator": "Exists"}])
    tainted = {"t": _gpu_node("t", 8, taints=[{"key": "gpu", "effect": "NoSchedule"}])}
    assert placement.choose(tainted, {}, tp4, source=None).node is None
    assert placement.choose(tainted, {}, tolerated, source=None).node == "t"


def test_recovery_record_never_holds_null_and_round_trips() -> None:
    rec = record.Recovery(id="r", replica=2, kind="device", reason="Xid", message="m", action="Reschedule",
                          detected_at="t", lost_ranks=[1])  # fmt: skip
    rec.faults = [record.RankFault(1, "device", "Xid", UUID)]
    raw = rec.to_dict()

    def nulls(value: Any) -> bool:
        if isinstance(value, dict):
            return any(v is None or nulls(v) for v in value.values())
        return isinstance(value, list) and any(nulls(v) for v in value)

    assert not nulls(raw) and raw["lostRanks"] == [1] and raw["target"] == ""
    assert record.Recovery.from_dict(raw) == rec
    # A record written by an older operator (fewer keys) still loads; a malformed one is dropped.
    old = {"id": "x", "replica": 0, "kind": "process", "reason": "r", "message": "",
           "action": "RestartInPlace", "detectedAt": "t"}  # fmt: skip
    assert record.in_flight([old, {"junk": 1}])[0].step == "Detected"


def _walk(rec: record.Recovery) -> list[str]:
    seen = []
    while rec.step != record.DONE:
        rec.step = record.next_step(rec)
        if rec.step == record.PLACED and not rec.target:
            rec.target = "n2"
        seen.append(rec.step)
    return seen


def test_steps_per_kind_of_recovery() -> None:
    base: dict[str, Any] = {"id": "r", "replica": 0, "message": "", "detected_at": "t", "source": "n1"}
    base["protected"] = True
    device = record.Recovery(kind="device", reason="Xid", action="Reschedule", lost_ranks=[1], **base)
    assert _walk(device) == ["MarkedLost", "PodDeleted", "Rebuilt", "Placed", "KVReady", "PodCreated",
                             "Running", "Released", "Done"]  # fmt: skip
    swap = record.Recovery(kind="device", reason="Xid", action="Reschedule", lost_ranks=[1], target="n1", **base)  # noqa: E501
    assert "Released" not in _walk(swap)  # same node: nothing moved, nothing to free
    process = record.Recovery(kind="process", reason="OOMKilled", action="RestartInPlace", target="n1", **base)  # noqa: E501
    assert _walk(process) == ["PodDeleted", "Placed", "KVReady", "PodCreated", "Running", "Done"]
    node = record.Recovery(kind="node", reason="NodeNotReady", action="Reschedule", source_alive=False, **base)  # noqa: E501
    assert _walk(node) == ["PodDeleted", "Placed", "KVReady", "PodCreated", "Running", "Done"]
    restarted = record.Recovery(kind="process", reason="ContainerRestarted", action="RecordOnly", **base)
    assert _walk(restarted) == ["Done"]


def test_outcome_is_never_succeeded_when_expected_bytes_did_not_come_back() -> None:
    base: dict[str, Any] = {"id": "r", "replica": 0, "message": "", "detected_at": "t", "source": "n1"}
    base["protected"] = True
    rec = record.Recovery(kind="device", reason="Xid", action="Reschedule", lost_ranks=[1], target="n1",
                          expected_chunks=5, **base)  # fmt: skip
    rec.note("rebuild given up: UNAVAILABLE")
    # Nothing came back: Degraded, and the KV was not rebuilt (it is recomputed).
    assert record.outcome(rec)[:2] == ("Degraded", "Recomputed") and "UNAVAILABLE" in record.outcome(rec)[2]
    rec.chunks_rebuilt, rec.bytes_rebuilt = 5, 5 << 15
    assert record.outcome(rec)[:2] == ("Succeeded", "Rebuilt")
    moved = record.Recovery(kind="device", reason="Xid", action="Reschedule", lost_ranks=[1], target="n2",
                            expected_chunks=5, chunks_rebuilt=5, group_found=True, **base)  # fmt: skip
    assert record.outcome(moved)[:2] == ("Degraded", "Recomputed")
    moved.bytes_moved = 1 << 20
    assert record.outcome(moved)[:2] == ("Succeeded", "Moved")
    lost = record.Recovery(kind="node", reason="NodeDeleted", action="Reschedule", source_alive=False, **base)
    assert record.outcome(lost) == ("Succeeded", "Recomputed", "KV recomputed: node n1 was lost")
    assert record.outcome(lost, failed="timed out")[0] == "Failed"


def test_kv_is_never_rebuilt_or_moved_without_bytes() -> None:
    # The cluster's operator-kill scenario after a sidecar restart: the in-flight requests' commits had
    # not reached the sidecar, so it held no protected chunk at detection (expected 0), the Rebuild
    # restored 0 bytes and every chunk was recomputed. That is a success, but not a rebuild.
    base: dict[str, Any] = {"id": "r", "replica": 0, "message": "", "detected_at": "t", "source": "n1"}
    swap = record.Recovery(kind="device", reason="GpuLost", action="Reschedule", lost_ranks=[0], target="n1",
                           protected=True, group_found=True, chunks_recomputed=48, **base)  # fmt: skip
    result, kv, message = record.outcome(swap)
    assert (result, kv) == ("Succeeded", "Recomputed"), message
    assert "no protected chunk of ranks [0]" in message and "48 chunks recomputed" in message
    assert record.outcome(swap, failed="timed out")[:2] == ("Failed", "Recomputed")
    swap.bytes_rebuilt, swap.chunks_rebuilt = 1 << 20, 32
    assert record.outcome(swap)[:2] == ("Succeeded", "Rebuilt")  # hybrid: some rebuilt, some recomputed
    # Unprotected replica: nothing could be rebuilt.
    bare = record.Recovery(kind="device", reason="Xid", action="Reschedule", lost_ranks=[1], target="n1",
                           **base)  # fmt: skip
    result, kv, message = record.outcome(bare)
    assert (result, kv) == ("Succeeded", "Recomputed") and "not protected" in message
    # A move of a group the source did not hold moved nothing: recomputed on the target.
    empty = record.Recovery(kind="device", reason="Xid", action="Reschedule", lost_ranks=[1], target="n2",
                            protected=True, **base)  # fmt: skip
    assert record.outcome(empty)[:2] == ("Succeeded", "Recomputed") and "to move" in record.outcome(empty)[2]
    empty.bytes_moved = 1 << 20
    assert record.outcome(empty)[:2] == ("Succeeded", "Moved")
    process = record.Recovery(kind="process", reason="OOMKilled", action="RestartInPlace", target="n1",
                              **base)  # fmt: skip
    assert record.outcome(process)[:2] == ("Succeeded", "Preserved")


def test_chunks_recomputed_counts_each_chunk_once() -> None:
    # PlanRecovery lists unprotected chunks; the Rebuild of every chunk past r then fails those same
    # chunks (NOT_PROTECTED): one chunk, counted once (the status once said 96 for 48 such chunks).
    stale = {f"old-{i}": (0, list(range(12))) for i in range(4)}
    failed = {f"old-{i}": list(range(12)) for i in range(4)}
    assert record.chunks_recomputed(stale, failed) == 48
    # r recomputed chunks, an unprotected one past r, a checksum mismatch past r, a chunk outside the
    # plan's committed prefix that the Rebuild failed: 3 + 1 + 1 + 1.
    assert record.chunks_recomputed({"a": (3, [5])}, {"a": [5, 7], "b": [20]}) == 6
    assert record.chunks_recomputed({"a": (0, [])}, {}) == 0


def reschedule(observed: list[tuple[int | None, faults.Fault]]) -> record.Recovery:
    """The rank-policy reschedule of protected replica 0 on n1 for the faults observed."""
    return remediation.plan(
        observed,
        remediation.Decision(remediation.RESCHEDULE),
        replica=0, old_uid="u", node="n1", protected=True, policy="rank", detected_at="t", recovery_id="r",
    )  # fmt: skip


def test_mixed_faults_lose_only_the_device_faulted_ranks() -> None:
    process = faults.Fault("process", "ContainerTerminated", "exit 1", node="n1")
    device = faults.Fault("device", "Xid", "GPU x", node="n1", gpu=UUID)
    rec = reschedule([(None, process), (2, device)])
    assert (rec.kind, rec.lost_ranks, rec.source_alive, rec.target) == ("device", [2], True, "")
    gone = faults.Fault("node", "NodeDeleted", "gone", node="n1", node_wide=True)
    rec = reschedule([(None, gone), (2, device)])
    assert (rec.kind, rec.lost_ranks, rec.source_alive, rec.avoid) == ("node", [], False, ["n1"])


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


def test_protected_condition_is_honest() -> None:
    def condition(**figures: Any) -> str:
        prot = status.protection_summary(enabled=True, parity_bytes=0, **figures)
        rows = [{"group": 0, "rank": 0, "pod": "p", "node": "n", "gpu": "", "state": "Ready", "restarts": 0}]
        out = status.summary(spec_valid=True, rows=rows, recovery=None, gave_up=None, ever_served=True,
                             protection=prot, old_conditions=[], generation=4, now="T")  # fmt: skip
        assert all(c["observedGeneration"] == 4 for c in out["conditions"])
        return str(next(c["status"] for c in out["conditions"] if c["type"] == "Protected"))

    assert condition(protected_chunks=3, unprotected_chunks=0) == "True"
    assert condition(protected_chunks=0, unprotected_chunks=0) == "False"  # 0/0 protects nothing
    assert condition(protected_chunks=3, unprotected_chunks=1) == "False"  # a backlog without parity
    assert condition(protected_chunks=3, unprotected_chunks=0, known=False) == "Unknown"
    again = status.conditions([{"type": "Ready", "status": "False", "lastTransitionTime": "T1"}],
                              {"Ready": ("False", "RanksNotReady", "x")}, now="T2")  # fmt: skip
    assert again[0]["lastTransitionTime"] == "T1"
