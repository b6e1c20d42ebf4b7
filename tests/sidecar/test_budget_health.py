"""A full parity budget evicts per policy and says so; GPU health is watched and injected."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import grpc
import inproc
import kv
import numpy as np
import pytest
from ghostserve.sidecar import budget, client, config, pools
from ghostserve.v1 import sidecar_pb2 as pb

N = 2


@pytest.fixture
def small(short_tmp: pathlib.Path, shm_prefix: str) -> Iterator[client.SidecarClient]:
    # xor over 2 ranks: one 4 KiB parity shard per chunk; room for exactly 4 chunks plus the ledger the
    # first test ends with (its memory counts in the budget): 3 requests, 5 chunks, 40 recorded tokens.
    slots, none = np.zeros(kv.CHUNK, np.int64), np.zeros(0, np.int64)
    ledger = 3 * budget.REQUEST_OVERHEAD + 5 * budget.chunk_bytes(slots, none) + 40 * 8
    cfg = config.Config(budget_bytes=4 * 4096 + ledger, fake_gpus=2, shm_prefix=shm_prefix)
    with inproc.served(short_tmp, cfg) as c:
        yield c


def commit(c: client.SidecarClient, rid: str, idx: int, *, group: str = "b") -> int:
    slots = list(range((idx % 16) * kv.CHUNK, (idx % 16 + 1) * kv.CHUNK))
    state = 0
    for r in range(N):
        state = c.commit_chunk(group=group, rank=r, request_id=rid, chunk_index=idx, slots=slots).state
    return state


def test_full_budget_evicts_the_shortest_request_first(small: client.SidecarClient) -> None:
    c = small
    for r in range(N):
        c.attach(group="b", rank=r, world_size=N, layout=kv.LAYOUT, protection=kv.protection("xor", 1))
    for idx in range(3):
        commit(c, "long", idx)
    commit(c, "short", 0)
    assert c.flush("b", wait=30).drained
    assert c.get_stats().parity_bytes_held == 4 * 4096
    c.record_tokens(group="b", request_id="newer", token_ids=list(range(40)), prompt_tokens=40)
    commit(c, "newer", 0)
    assert c.flush("b", wait=30).drained
    desc = {r.request_id: r.chunks_protected for r in c.describe_group(group="b").requests}
    assert desc == {"long": 3, "short": 0, "newer": 1}
    stats = c.get_stats()
    assert stats.evictions == 1 and stats.parity_bytes_held == 4 * 4096 and stats.chunks_unprotected == 1
    # The evicted chunk is reported as such when a rank is lost.
    c.mark_lost(group="b", ranks=[1], reason="test")
    report = {r.request_id: r for r in c.rebuild(group="b", lost_ranks=[1]).requests}
    assert [(f.chunk_index, f.reason) for f in report["short"].failed_chunks] == [(0, pb.EVICTED)]
    assert sorted(report["long"].rebuilt_chunks) == [0, 1, 2]
    freed = c.release_request(group="b", request_id="long").freed_bytes
    assert freed == 3 * 4096
    c.delete_group(group="b")


def test_budget_full_of_encodes_in_flight_is_resource_exhausted(
    short_tmp: pathlib.Path, shm_prefix: str
) -> None:
    cfg = config.Config(budget_bytes=4096 - 1, fake_gpus=0, shm_prefix=shm_prefix)
    bg = inproc.Background(inproc.unix_address(short_tmp), cfg)
    try:
        with client.SidecarClient(inproc.unix_address(short_tmp)) as c:
            for r in range(N):
                c.attach(
                    group="b", rank=r, world_size=N, layout=kv.LAYOUT, protection=kv.protection("xor", 1)
                )
            c.commit_chunk(group="b", rank=0, request_id="q", chunk_index=0, slots=list(range(16)))
            with pytest.raises(grpc.RpcError) as err:
                c.commit_chunk(group="b", rank=1, request_id="q", chunk_index=0, slots=list(range(16)))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            (req,) = c.describe_group(group="b").requests
            assert req.chunks_committed == 1 and req.chunks_protected == 0
            c.delete_group(group="b")
    finally:
        bg.stop()


def test_code_none_keeps_nothing_and_commits_before_attach_fail(small: client.SidecarClient) -> None:
    c = small
    c.attach(group="n", rank=0, world_size=N, layout=kv.LAYOUT, protection=kv.protection("none"))
    with pytest.raises(grpc.RpcError) as err:
        c.commit_chunk(group="n", rank=1, request_id="q", chunk_index=0, slots=list(range(16)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    c.attach(group="n", rank=1, world_size=N, layout=kv.LAYOUT, protection=kv.protection("none"))
    assert commit(c, "q", 0, group="n") == pb.UNPROTECTED
    assert c.get_stats().parity_bytes_held == 0
    with pytest.raises(grpc.RpcError) as err:
        c.attach(group="n", rank=0, world_size=N, layout=kv.LAYOUT, protection=kv.protection("xor", 1))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    plan = c.plan_recovery(group="n", lost_ranks=[0], prefill_tokens_per_s=1000.0)
    assert [(p.total_chunks, p.recompute_chunks) for p in plan.requests] == [(1, 1)]
    c.delete_group(group="n")


def test_watch_health_sends_state_then_only_changes(small: client.SidecarClient) -> None:
    c = small
    stream = c.watch_health(initial_state=True, timeout=30)
    initial = [next(stream), next(stream)]
    assert [(e.gpu_index, e.kind, e.fatal) for e in initial] == [
        (0, pb.HEALTHY, False),
        (1, pb.HEALTHY, False),
    ]
    c.inject_fault(gpu_index=1, kind=pb.XID, xid=79, message="fell off the bus")
    c.inject_fault(gpu_index=0, kind=pb.RETIRED_PAGES)
    got = [next(stream), next(stream)]
    assert [(e.gpu_index, e.kind, e.xid, e.fatal) for e in got] == [
        (1, pb.XID, 79, True),
        (0, pb.RETIRED_PAGES, 0, False),
    ]
    stream.cancel()  # type: ignore[attr-defined]
    late = c.watch_health(initial_state=True, timeout=30)
    assert next(late).kind == pb.RETIRED_PAGES  # gpu 0's current state
    late.cancel()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as err:
        c.inject_fault(gpu_index=5, kind=pb.XID)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_pool_mapped_by_a_worker_outlives_the_worker(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    import subprocess
    import sys

    cfg = config.Config(fake_gpus=0, shm_prefix=shm_prefix)
    bg = inproc.Background(inproc.unix_address(short_tmp), cfg)
    try:
        with client.SidecarClient(inproc.unix_address(short_tmp)) as c:
            h = c.attach(
                group="p", rank=0, world_size=1, layout=kv.LAYOUT, protection=kv.protection("xor", 1)
            ).pool
            script = (
                "import os, signal; from ghostserve.sidecar import pools\n"
                "from ghostserve.v1 import sidecar_pb2\n"
                f"h = sidecar_pb2.PoolHandle(kind='cpu', shm_name={h.shm_name!r}, nbytes={h.nbytes})\n"
                "mm, a = pools.map_pool(h); a[:] = 7; print('ok', flush=True)\n"
                "os.kill(os.getpid(), signal.SIGKILL)\n"
            )
            proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
            assert proc.returncode == -9 and b"ok" in proc.stdout
            mm, pool = pools.map_pool(h)
            assert int(pool.min()) == 7 == int(pool.max())
            del pool
            mm.close()
            with pytest.raises(Exception, match="cpu pools only"):
                pools.map_pool(pb.PoolHandle(kind="cuda", shm_name=h.shm_name, nbytes=h.nbytes))
            c.delete_group(group="p")
            assert not (pools.SHM_DIR / h.shm_name).exists()
    finally:
        bg.stop()
