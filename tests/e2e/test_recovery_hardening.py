"""Recovery never gives up while faults <= M (issue 13 item 6). Each test injects its fault through
seams the engine had before the fix (Cluster.broadcast, recovery._rebuild, the harness's on_step), and
each failed before it: the fault escaped as RankFault / grpc.RpcError / RankError and ended serving."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest
from e2e_support import CFG, assert_no_live_ranks, assert_pools_freed, options, requests
from ghostserve.engine import sidecar_process
from ghostserve.engine.reference import cluster, engine, harness, rank, recovery


def _run(sidecar, workdir, name, opts, faults=(), on_step=None):
    where = workdir / name
    return harness.run(
        CFG, opts, requests(), sidecar=sidecar, group=name, workdir=where, faults=faults, on_step=on_step
    )


def _assert_identical(res, base):
    assert res.outputs == base.outputs
    assert res.digests == base.digests
    assert_no_live_ranks(res.rank_pids)
    assert_pools_freed(res.pool_names)


def _kill_after(monkeypatch, when, victim: int) -> list[str]:
    """SIGKILL rank ``victim`` right after the first broadcast for which ``when(msg)`` holds."""
    fired: list[str] = []
    original = cluster.Cluster.broadcast

    def broadcast(self, msg):
        original(self, msg)
        if not fired and when(msg):
            fired.append(type(msg).__name__)
            self.kill(victim)

    monkeypatch.setattr(cluster.Cluster, "broadcast", broadcast)
    return fired


def test_rank_fault_while_finishing_a_request(sidecar, workdir, baseline, monkeypatch, no_shm_leak):
    # Before: Digest/Drop ran outside the recover-and-retry scope; the RankFault ended serving.
    fired = _kill_after(monkeypatch, lambda m: isinstance(m, rank.Drop), victim=1)
    res = _run(sidecar, workdir, "finish-fault", options(2))
    assert fired == ["Drop"]
    _assert_identical(res, baseline(2))
    [rec] = res.recoveries
    assert rec.kind == "process"


def test_process_fault_during_device_recovery_replay_starts_over(
    sidecar, workdir, baseline, monkeypatch, no_shm_leak
):
    # Before: a RankFault raised inside recovery.recover escaped the step's except clause.
    replay = lambda m: isinstance(m, rank.Step) and not m.want_tokens  # noqa: E731
    fired = _kill_after(monkeypatch, replay, victim=0)
    res = _run(sidecar, workdir, "replay-fault", options(2), [engine.Fault(12, "device", (1,))])
    assert fired == ["Step"]
    _assert_identical(res, baseline(2))
    [rec] = res.recoveries
    # The recovery that completed still restored rank 1 (pending_lost), though rank 1's pool may already
    # have been marked valid by the interrupted recovery's rebuild.
    assert rec.kind == "device" and rec.lost_ranks == [1]


def test_sidecar_restart_during_rebuild_is_waited_for(sidecar, workdir, baseline, monkeypatch, no_shm_leak):
    # Before: the raw UNAVAILABLE of the Rebuild RPC ended serving.
    events: list[str] = []
    original = recovery._rebuild

    def rebuild_while_sidecar_restarts(eng, lost, first):
        if events:
            return original(eng, lost, first)
        sidecar.kill()
        events.append("killed")
        try:
            return original(eng, lost, first)
        finally:
            sidecar.start()
            events.append("started")

    monkeypatch.setattr(recovery, "_rebuild", rebuild_while_sidecar_restarts)
    res = _run(sidecar, workdir, "rebuild-sidecar", options(2), [engine.Fault(12, "device", (1,))])
    assert events == ["killed", "started"]
    _assert_identical(res, baseline(2))
    [rec] = res.recoveries
    assert rec.lost_ranks == [1]
    # The parity died with the old sidecar: everything of rank 1 was recomputed.
    assert rec.chunks_rebuilt == 0 and rec.chunks_recomputed > 0


def test_ranks_retry_attach_while_the_sidecar_restarts(sidecar, workdir, baseline, no_shm_leak):
    # Before: a restarted rank whose Attach met UNAVAILABLE died at once; the RankFault from the restart
    # escaped recovery and ended serving.
    name = "attach-retry"
    store = workdir / name / "gloo-1"
    events: list[str] = []

    def restart_when_ranks_attach() -> None:
        deadline = time.monotonic() + 60
        while not store.exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for the restarted ranks' gloo store: they attach right after it
        sidecar.start()
        events.append("started")

    restarter = threading.Thread(target=restart_when_ranks_attach, daemon=True)

    def crash(eng):
        if eng.counters.steps == 10 and not events:
            sidecar.kill()
            events.append("killed")
            assert eng.cluster is not None
            eng.cluster.kill(1)
            restarter.start()

    res = _run(sidecar, workdir, name, options(2), on_step=crash)
    # The ranks may attach before sidecar.start() has seen the new sidecar's health answer.
    restarter.join(120)
    assert events == ["killed", "started"]
    _assert_identical(res, baseline(2))
    assert len(res.recoveries) == 1 and res.recoveries[0].kind == "process"


@pytest.fixture
def tiny_budget_sidecar(workdir: pathlib.Path):
    prefix = f"gs-tiny{workdir.name[-6:].lower()}"
    sc = sidecar_process.SidecarProcess(
        workdir / "tiny-sidecar", budget="4KiB", extra_args=("--shm-prefix", prefix)
    )
    sc.start()
    yield sc
    sc.stop()


def test_parity_budget_below_one_chunk_serves_unprotected(tiny_budget_sidecar, workdir, baseline):
    # Before: CommitChunk's RESOURCE_EXHAUSTED ("recorded, unprotected") was raised as a rejected commit;
    # the rank reported an error and serving stopped. Now serving goes on and a device fault recomputes.
    res = _run(tiny_budget_sidecar, workdir, "tiny-budget", options(2), [engine.Fault(12, "device", (1,))])
    _assert_identical(res, baseline(2))
    [rec] = res.recoveries
    assert rec.chunks_rebuilt == 0 and rec.chunks_recomputed > 0
