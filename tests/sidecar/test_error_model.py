"""The error model (issue 13 item 5): undecodable requests, a full spill disk, damaged spill records,
survivors that changed since the encode, and one group's lock never stalling another group or health.
Each test names what it did before the fix."""

from __future__ import annotations

import json
import pathlib
import subprocess
from collections.abc import Iterator

import grpc
import inproc
import kv
import numpy as np
import pytest
from ghostserve.sidecar import client, config, custodian, ledger, pools, restore
from ghostserve.v1 import sidecar_pb2 as pb

N = 2


def attach_all(c: client.SidecarClient, group: str, code: str = "xor", m: int = 1) -> list[np.ndarray]:
    out = []
    for r in range(N):
        reply = c.attach(
            group=group, rank=r, world_size=N, layout=kv.LAYOUT, protection=kv.protection(code, m)
        )
        _mm, pool = pools.map_pool(reply.pool)
        pool[:] = kv.pool_content(r, pool.size)
        out.append(pool)
    return out


def commit(c: client.SidecarClient, group: str, rid: str, idx: int) -> None:
    slots = list(range(idx * kv.CHUNK, (idx + 1) * kv.CHUNK))
    for r in range(N):
        c.commit_chunk(group=group, rank=r, request_id=rid, chunk_index=idx, slots=slots)


def test_undecodable_and_oversized_requests(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    """Garbage bytes are INVALID_ARGUMENT with no traceback in the log (before: UNKNOWN, with an ERROR
    traceback); a message over the limit is RESOURCE_EXHAUSTED before anything is decoded."""
    cfg = config.Config(budget_bytes=1 << 20, fake_gpus=1, shm_prefix=shm_prefix)
    garbage = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01" * 3
    with inproc.served(short_tmp, cfg), grpc.insecure_channel(inproc.unix_address(short_tmp)) as ch:
        for method in pb.DESCRIPTOR.services_by_name["Sidecar"].methods:
            if method.client_streaming:
                continue
            path = f"/ghostserve.v1.Sidecar/{method.name}"
            if method.server_streaming:
                call = ch.unary_stream(path)
                with pytest.raises(grpc.RpcError) as err:
                    list(call(garbage, timeout=10))
            else:
                with pytest.raises(grpc.RpcError) as err:
                    ch.unary_unary(path)(garbage, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
        big = b"\x00" * (5 << 20)  # over the default 4 MiB limit: refused before it is decoded
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/ghostserve.v1.Sidecar/RecordTokens")(big, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_record_tokens_counts_in_the_budget(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    """Token lists are charged to the budget (before: outside it, ~8x amplification)."""
    cfg = config.Config(budget_bytes=256 << 10, fake_gpus=1, shm_prefix=shm_prefix)
    with inproc.served(short_tmp, cfg) as c:
        attach_all(c, "g")
        c.record_tokens(group="g", request_id="a", token_ids=list(range(20_000)), prompt_tokens=1)
        with pytest.raises(grpc.RpcError) as err:
            c.record_tokens(group="g", request_id="b", token_ids=list(range(40_000)), prompt_tokens=1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError):
            c.describe_request(group="g", request_id="b")  # nothing recorded
        c.release_request(group="g", request_id="a")
        c.record_tokens(group="g", request_id="b", token_ids=list(range(20_000)), prompt_tokens=1)
        c.delete_group(group="g")


@pytest.fixture
def tiny_fs(short_tmp: pathlib.Path) -> Iterator[pathlib.Path]:
    """A real 24 KiB tmpfs: writes beyond it fail with ENOSPC, like a full disk."""
    d = short_tmp / "spill"
    d.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(d)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_spill_write_failure_releases_parity_and_reports_the_chunk_unprotected(
    short_tmp: pathlib.Path, tiny_fs: pathlib.Path, shm_prefix: str
) -> None:
    """Before: the reservation leaked and chunks stayed QUEUED while Flush said drained."""
    cfg = config.Config(budget_bytes=1 << 20, fake_gpus=1, spill_dir=tiny_fs, shm_prefix=shm_prefix)
    (short_tmp / "s").mkdir()
    with inproc.served(short_tmp / "s", cfg) as c:
        attach_all(c, "g")
        for idx in range(12):  # 4 KiB of parity each: the disk fills after a few
            commit(c, "g", "r", idx)
        flush = c.flush("g", wait=30)
        assert flush.drained and flush.chunks_queued == 0
        states = [ch.state for ch in c.describe_request(group="g", request_id="r").chunks]
        assert pb.QUEUED not in states
        protected = states.count(pb.PROTECTED)
        assert 0 < protected < 12 and states.count(pb.UNPROTECTED) == 12 - protected
        assert c.get_stats().parity_bytes_held == protected * 4096
        c.delete_group(group="g")


def test_a_damaged_spill_record_drops_that_chunk_only(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    """Before: a bad record made restore drop the whole group (or every Rebuild fail INTERNAL)."""
    cfg = config.Config(
        budget_bytes=1 << 20,
        state_dir=short_tmp / "state",
        spill_dir=short_tmp / "spill",
        keep_pools=True,
        shm_prefix=shm_prefix,
    )
    c = custodian.Custodian(cfg)
    from ghostserve.sidecar import convert, group

    settings = group.Settings(
        N, convert.layout_from(kv.LAYOUT), convert.protection_from(kv.protection("xor", 1), N)
    )
    for r in range(N):
        c.attach("g", r, settings, worker_id="w")
        seg = c.groups["g"].ranks[r].segment
        assert seg is not None
        seg.array[:] = kv.pool_content(r, seg.nbytes)
    for idx in range(4):
        slots = np.arange(idx * kv.CHUNK, (idx + 1) * kv.CHUNK, dtype=np.int64)
        for r in range(N):
            c.commit_chunk("g", r, "req", idx, slots=slots, token_ids=np.zeros(0, np.int64))
    assert c.flush("g", timeout=30)[0]
    c.close()
    records = sorted((short_tmp / "spill").rglob("*.json"), key=lambda p: int(p.stem))
    bad = json.loads(records[1].read_text())
    bad["checksums"] = bad["checksums"][:1]
    records[1].write_text(json.dumps(bad))
    records[2].write_text("{not json")
    records[3].with_suffix(".bin").write_bytes(b"short")
    c = custodian.Custodian(cfg)
    try:
        restore.restore(c)
        req = c.groups["g"].ledger.requests["req"]
        assert [req.chunks[i].state for i in range(4)] == [
            ledger.State.PROTECTED,
            ledger.State.UNPROTECTED,
            ledger.State.UNPROTECTED,
            ledger.State.UNPROTECTED,
        ]
        c.mark_lost("g", [1], reason="test")
        from ghostserve.sidecar import recovery

        report = recovery.rebuild(c, "g", [1], request_ids=[], first_chunk={})
        assert report.requests[0].rebuilt == [0]
        assert [f for _, f in report.requests[0].failed] == [ledger.Failure.NOT_PROTECTED] * 3
    finally:
        c.delete_group("g")
        c.close()


def test_replicate_checks_survivors_before_rebuilding(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    """A survivor whose KV changed since the encode means the chunk is not what was protected: it is
    reported CHECKSUM_MISMATCH. Before: replicate never checked survivors and rebuilt it."""
    cfg = config.Config(budget_bytes=1 << 20, fake_gpus=1, shm_prefix=shm_prefix)
    with inproc.served(short_tmp, cfg) as c:
        pool_arrays = attach_all(c, "g", "replicate")
        for idx in range(2):
            commit(c, "g", "r", idx)
        assert c.flush("g", wait=30).drained
        rows = pool_arrays[0].reshape(4, kv.LAYOUT.pool_slots, kv.ROW_BYTES)
        rows[:, 3, :] ^= 0xFF  # chunk 0's slot 3 on rank 0 changes after the encode
        c.mark_lost(group="g", ranks=[1], reason="test")
        report = c.rebuild(group="g", lost_ranks=[1]).requests[0]
        assert list(report.rebuilt_chunks) == [1]
        assert [(f.chunk_index, f.reason) for f in report.failed_chunks] == [(0, pb.CHECKSUM_MISMATCH)]
        c.delete_group(group="g")


def test_one_groups_lock_stalls_neither_other_groups_nor_health(
    short_tmp: pathlib.Path, shm_prefix: str
) -> None:
    """Before: one global lock, taken on the event loop: a long rebuild of one group stalled every
    group's commits and the health service."""
    cfg = config.Config(budget_bytes=1 << 20, fake_gpus=1, shm_prefix=shm_prefix)
    bg = inproc.Background(inproc.unix_address(short_tmp), cfg)
    try:
        with client.SidecarClient(inproc.unix_address(short_tmp), timeout=10) as c:
            attach_all(c, "busy")
            attach_all(c, "other")
            busy = bg.server.custodian.groups["busy"]
            with busy.lock:  # what a long rebuild step of "busy" would hold
                assert c.health() == 1
                commit(c, "other", "r", 0)
                assert c.describe_group(group="other").requests[0].chunks_committed == 1
                with pytest.raises(grpc.RpcError) as err:
                    c.commit_chunk(
                        group="busy",
                        rank=0,
                        request_id="r",
                        chunk_index=0,
                        slots=list(range(16)),
                        timeout=0.5,
                    )
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            commit(c, "busy", "r", 0)
            for g in ("busy", "other"):
                c.delete_group(group=g)
    finally:
        bg.stop()


def test_spill_write_failure_without_a_mount(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    """The same path where no tmpfs can be mounted: the group's spill directory is a file (ENOTDIR)."""
    from ghostserve.sidecar import persist

    spill = short_tmp / "spill"
    cfg = config.Config(budget_bytes=1 << 20, fake_gpus=1, spill_dir=spill, shm_prefix=shm_prefix)
    (short_tmp / "s").mkdir()
    with inproc.served(short_tmp / "s", cfg) as c:
        attach_all(c, "g")
        (spill / persist.key_of("g")).write_bytes(b"in the way")
        for idx in range(3):
            commit(c, "g", "r", idx)
        flush = c.flush("g", wait=30)
        assert flush.drained and flush.chunks_queued == 0
        states = [ch.state for ch in c.describe_request(group="g", request_id="r").chunks]
        assert states == [pb.UNPROTECTED] * 3
        assert c.get_stats().parity_bytes_held == 0
        c.delete_group(group="g")
