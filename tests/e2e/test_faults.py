"""Real sidecar + rank processes: every fault kind leaves output tokens and KV bytes identical to a
fault-free run, and leaks no process or shared memory."""

from __future__ import annotations

import pytest
from e2e_support import CFG, assert_no_live_ranks, assert_pools_freed, options, requests
from ghostserve.engine.reference import engine, harness, rank
from ghostserve.sidecar import client as client_mod


def _run(sidecar, workdir, name, opts, faults, on_step=None):
    return harness.run(
        CFG,
        opts,
        requests(),
        sidecar=sidecar,
        group=name,
        workdir=workdir / name,
        faults=faults,
        on_step=on_step,
    )


def _assert_identical(res, base):
    assert res.outputs == base.outputs
    # Per request, per rank, per chunk sha256 of the pool bytes at the request's slots.
    assert res.digests == base.digests
    assert all(len(d) == len(next(iter(base.digests.values()))) for d in res.digests.values())
    assert_no_live_ranks(res.rank_pids)
    assert_pools_freed(res.pool_names)


def test_process_fault_resumes_without_rebuild(sidecar, workdir, baseline, no_shm_leak):
    res = _run(sidecar, workdir, "process", options(2), [engine.Fault(12, "process", (1,))])
    _assert_identical(res, baseline(2))
    [rec] = res.recoveries
    assert rec.kind == "process" and rec.lost_ranks == [] and rec.bytes_rebuilt == 0
    assert rec.tokens_recomputed == 0
    assert res.counters.generations == 2


@pytest.mark.parametrize("code", ["xor", "replicate"])
def test_device_fault_rebuilds_lost_rank(sidecar, workdir, baseline, no_shm_leak, code):
    res = _run(sidecar, workdir, f"device-{code}", options(2, code), [engine.Fault(12, "device", (1,))])
    _assert_identical(res, baseline(2))
    [rec] = res.recoveries
    assert rec.kind == "device" and rec.lost_ranks == [1]
    assert rec.chunks_rebuilt > 0 and rec.bytes_rebuilt > 0 and rec.failed_chunks == 0


def test_device_fault_hybrid_plan_recomputes_head(sidecar, workdir, baseline, no_shm_leak):
    # Planner inputs fixed so the plan is deterministic: a chunk (16 tokens, 8 KiB shard) recomputes in
    # 16 ms and rebuilds in 32 ms, so with 4 committed chunks r = 3 (max(48, 32) beats max(32, 64)).
    opts = options(2, plan_prefill_tokens_per_s=1000.0, plan_rebuild_bytes_per_s=8192 / 0.032)
    res = _run(sidecar, workdir, "hybrid", opts, [engine.Fault(14, "device", (0,))])
    _assert_identical(res, baseline(2))
    [rec] = res.recoveries
    assert set(rec.plan.values()) == {3}, rec.plan
    assert rec.chunks_rebuilt == 3
    assert rec.chunks_recomputed >= sum(rec.plan.values())


def test_none_baseline_recomputes_everything(sidecar, workdir, baseline, no_shm_leak):
    res = _run(sidecar, workdir, "none", options(2, "none"), [engine.Fault(12, "device", (1,))])
    _assert_identical(res, baseline(2))
    [rec] = res.recoveries
    assert rec.bytes_rebuilt == 0 and rec.chunks_rebuilt == 0 and rec.chunks_recomputed > 0


@pytest.mark.parametrize("code", ["rs", "rdp"])
def test_two_device_faults_in_one_group(sidecar, workdir, baseline, no_shm_leak, code):
    res = _run(sidecar, workdir, f"two-{code}", options(4, code), [engine.Fault(12, "device", (1, 2))])
    _assert_identical(res, baseline(4))
    [rec] = res.recoveries
    assert rec.lost_ranks == [1, 2]
    assert rec.chunks_rebuilt > 0 and rec.failed_chunks == 0


def test_two_losses_with_xor_fall_back_to_recompute(sidecar, workdir, baseline, no_shm_leak):
    res = _run(sidecar, workdir, "two-xor", options(4, "xor"), [engine.Fault(12, "device", (0, 3))])
    _assert_identical(res, baseline(4))
    [rec] = res.recoveries
    assert rec.chunks_rebuilt == 0 and rec.chunks_recomputed > 0


def test_sidecar_restart_during_serving_then_device_fault(sidecar, workdir, baseline, no_shm_leak):
    events: list[tuple[str, int]] = []
    protected: list[int] = []

    def crash_sidecar(eng):
        # Down for steps 6..8: serving goes on, commits meanwhile fail and stay unprotected. A rank's
        # first commit after the restart may still meet its old channel's reconnect backoff
        # (UNAVAILABLE: that chunk stays unprotected too), so count what the new sidecar protected.
        if eng.counters.steps == 35 and len(events) == 2:
            eng.cluster.call(rank.Drain())
            with client_mod.SidecarClient(sidecar.address) as c:
                c.flush(eng.group, wait=60.0)
                protected.append(sum(r.chunks_protected for r in c.describe_group(group=eng.group).requests))
        if eng.counters.steps == 6 and not events:
            sidecar.kill()
            events.append(("killed", eng.counters.steps))
        elif eng.counters.steps == 9 and len(events) == 1:
            sidecar.start()
            events.append(("started", eng.counters.steps))

    res = _run(
        sidecar,
        workdir,
        "sidecar-restart",
        options(2),
        [engine.Fault(36, "device", (1,))],
        on_step=crash_sidecar,
    )
    _assert_identical(res, baseline(2))
    assert events == [("killed", 6), ("started", 9)]
    [rec] = res.recoveries
    # Parity held in the crashed sidecar's memory is gone and chunks completed while it was down were
    # never encoded: those were recomputed; every chunk the restarted sidecar protected was rebuilt
    assert rec.chunks_recomputed > 0, rec
    # (except those the hybrid plan chose to recompute: the first r chunks of each request).
    assert len(protected) == 1, protected
    assert rec.chunks_rebuilt <= protected[0] <= rec.chunks_rebuilt + sum(rec.plan.values()), (protected, rec)
