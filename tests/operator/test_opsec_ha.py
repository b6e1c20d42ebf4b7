"""Two real `ghostserve operator` processes with leader election against one emulated cluster: only
the Lease holder acts, so every fault gets exactly one MarkLost and one replacement pod; when the
leader is SIGKILLed the standby takes the Lease over and handles the next fault, again exactly once."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from tests.operator import harness, opsec_support
from tests.operator.opsec_support import NS

FAST_LEASE = opsec_support.lease_flags(lease_s="4", renew_s="3", retry_s="0.5")


def _holder(cluster: harness.Cluster) -> str:
    lease = cluster.get(opsec_support.LEASES, NS, opsec_support.LEASE) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def _replica_pods_created(recorder: opsec_support.Recorder) -> list[str]:
    """Pods really created (a create refused with 409 because the old pod was still there is a retry)."""
    return recorder.created("pods")


def _fault_and_recover(cluster: harness.Cluster, pod: dict[str, Any], recoveries: int, what: str) -> None:
    """Fail the first GPU of `pod`, then wait until "llama" counts `recoveries` and serves again."""
    cluster.fail_gpu(pod["spec"]["nodeName"], harness.gpus_of(pod)[0])
    cluster.wait_for(
        lambda: (
            opsec_support.status(cluster, "llama").get("recoveries") == recoveries
            and opsec_support.serving(cluster, "llama")
        ),
        timeout=90,
        what=what,
    )


def test_two_operators_act_once_per_fault(
    cluster: harness.Cluster, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = opsec_support.recording(cluster, monkeypatch, leases=True)
    procs = {}
    for tag in ("a", "b"):
        monkeypatch.setenv("POD_NAME", f"op-{tag}")  # the Lease holder identity starts with it
        procs[tag] = opsec_support.operator(cluster, tmp_path, tag, *FAST_LEASE)
    try:
        cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
        cluster.wait_for(lambda: opsec_support.serving(cluster, "llama"), timeout=90, what="Serving")
        leader = _holder(cluster).split("-")[1]
        standby = "b" if leader == "a" else "a"
        assert _replica_pods_created(recorder) == ["llama-r0"]  # not one per operator

        first = cluster.get(harness.PODS, NS, "llama-r0")
        assert first is not None
        _fault_and_recover(cluster, first, 1, "first recovery")
        assert [r.group for _, _, r in cluster.calls("MarkLost")] == [f"{NS}/llama-r0"]
        assert len(cluster.calls("Rebuild")) == 1
        assert _replica_pods_created(recorder) == ["llama-r0", "llama-r0"]  # one replacement

        # The leader dies without a word; the standby waits out the lease, then acts alone.
        procs[leader].kill()
        cluster.wait_for(lambda: _holder(cluster).startswith(f"op-{standby}-"), timeout=60, what="takeover")
        second = cluster.get(harness.PODS, NS, "llama-r0")
        assert second is not None and second["metadata"]["uid"] != first["metadata"]["uid"]
        _fault_and_recover(cluster, second, 2, "second recovery by the new leader")
        assert [r.group for _, _, r in cluster.calls("MarkLost")] == [f"{NS}/llama-r0"] * 2
        assert len(cluster.calls("Rebuild")) == 2
        creates = [
            (c.status, (c.body.get("spec") or {}).get("affinity")) for c in recorder.of("pods", "create")
        ]
        assert _replica_pods_created(recorder) == ["llama-r0"] * 3, opsec_support.dumps(creates)
        lease = cluster.get(opsec_support.LEASES, NS, opsec_support.LEASE)
        assert lease is not None and lease["spec"]["leaseTransitions"] == 1
    finally:
        print(*opsec_support.stopped(*procs.values()))


def test_a_standby_never_acts(
    cluster: harness.Cluster, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: with the Lease held by someone else (a live leader elsewhere), an operator creates nothing."""
    recorder = opsec_support.recording(cluster, monkeypatch, leases=True)
    monkeypatch.setenv("POD_NAME", "op-a")
    leader = opsec_support.operator(cluster, tmp_path, "a", *FAST_LEASE)
    try:
        cluster.wait_for(lambda: _holder(cluster).startswith("op-a-"), timeout=60, what="a leads")
        leader.proc.send_signal(19)  # SIGSTOP: alive but silent; the lease must expire before b acts
        monkeypatch.setenv("POD_NAME", "op-b")
        standby = opsec_support.operator(cluster, tmp_path, "b", *FAST_LEASE)
        try:
            cluster.write("create", harness.GSD, NS, None, opsec_support.deployment("llama"))
            cluster.wait_for(lambda: _holder(cluster).startswith("op-b-"), timeout=60, what="b takes over")
            cluster.wait_for(lambda: opsec_support.serving(cluster, "llama"), timeout=90, what="Serving")
            leader.proc.send_signal(18)  # SIGCONT: the old leader wakes up, finds the Lease gone and exits
            assert leader.proc.wait(timeout=60) == 1
            assert "leader-lease-lost" in leader.output()
            assert _replica_pods_created(recorder) == ["llama-r0"]
        finally:
            print(*opsec_support.stopped(standby))
    finally:
        print(*opsec_support.stopped(leader))
