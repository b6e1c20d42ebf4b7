"""Bounded memory (issue 13 item 1): pool quotas and /dev/shm headroom, capped rebuild streams, a
journal compacted while running, and a soak of 200 concurrent hostile clients under which the
sidecar's anonymous memory stays within its budget plus a stated overhead.

Before the fix: pools had no per-group cap (two Attach calls took 94% of /dev/shm), streams were
uncapped (40 stalled readers held 2.6 GB), the journal grew until restart, and 16 maximal CommitChunk
calls took the sidecar to 4.6 GB."""

from __future__ import annotations

import asyncio
import os
import pathlib
import threading

import grpc
import grpc.aio
import inproc
import kv
import numpy as np
import pytest
from ghostserve.sidecar import client, config, convert, custodian, errors, group, pools, restore
from ghostserve.v1 import sidecar_pb2 as pb

N = 2
SETTINGS = group.Settings(
    N, convert.layout_from(kv.LAYOUT), convert.protection_from(kv.protection("xor", 1), N)
)
POOL = convert.layout_from(kv.LAYOUT).pool_nbytes


def test_pool_quotas_and_shm_headroom(shm_prefix: str) -> None:
    free = os.statvfs(pools.SHM_DIR).f_bavail * os.statvfs(pools.SHM_DIR).f_frsize
    cases = [
        (config.Config(max_group_pool_bytes=POOL + POOL // 2, shm_prefix=shm_prefix), "per-group"),
        (config.Config(max_pool_bytes=POOL + POOL // 2, shm_prefix=shm_prefix), "--max-pool-bytes"),
        (config.Config(shm_headroom_bytes=free - POOL - POOL // 2, shm_prefix=shm_prefix), "must stay free"),
    ]
    for cfg, message in cases:
        c = custodian.Custodian(cfg)
        try:
            c.attach("g", 0, SETTINGS, worker_id="w")
            with pytest.raises(errors.ResourceExhausted, match=message):
                c.attach("g", 1, SETTINGS, worker_id="w")
            assert c.groups["g"].ranks[1].segment is None
        finally:
            c.delete_group("g")
            c.close()


def test_rebuild_streams_are_capped(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    cfg = config.Config(budget_bytes=1 << 20, fake_gpus=1, shm_prefix=shm_prefix, max_rebuild_streams=1)
    bg = inproc.Background(inproc.unix_address(short_tmp), cfg)
    try:
        with client.SidecarClient(inproc.unix_address(short_tmp), timeout=20) as c:
            for r in range(N):
                c.attach(
                    group="g", rank=r, world_size=N, layout=kv.LAYOUT, protection=kv.protection("xor", 1)
                )
            for r in range(N):
                c.commit_chunk(group="g", rank=r, request_id="q", chunk_index=0, slots=list(range(16)))
            assert c.flush("g", wait=30).drained
            c.mark_lost(group="g", ranks=[1], reason="test")
            g = bg.server.custodian.groups["g"]
            first: list[object] = []
            with g.lock:  # the first stream is admitted, then waits for the group
                t = threading.Thread(
                    target=lambda: first.extend(c.stream_rebuild(group="g", lost_ranks=[1], rank=1))
                )
                t.start()
                servicer = bg.server.servicer
                assert servicer is not None
                kv.wait_until(lambda: servicer.streams == 1, what="the first stream to be served")
                with pytest.raises(grpc.RpcError) as err:
                    list(c.stream_rebuild(group="g", lost_ranks=[1], rank=1))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            t.join(30)
            assert len(first) == 1 and servicer.streams == 0
            c.delete_group(group="g")
    finally:
        bg.stop()


def test_journal_is_compacted_while_running(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    cfg = config.Config(
        state_dir=short_tmp, keep_pools=True, journal_compact_records=8, shm_prefix=shm_prefix
    )
    c = custodian.Custodian(cfg)
    for r in range(N):
        c.attach("g", r, SETTINGS, worker_id="w")
    journal = next(short_tmp.glob("ledger-*.jsonl"), None)
    for i in range(60):
        rid = f"r{i}"
        slots = np.arange((i % 16) * kv.CHUNK, (i % 16 + 1) * kv.CHUNK, dtype=np.int64)
        for r in range(N):
            c.commit_chunk("g", r, rid, 0, slots=slots, token_ids=np.zeros(0, np.int64))
        if i >= 3:
            c.release_request("g", f"r{i - 3}")  # three requests stay live
        journal = next(short_tmp.glob("ledger-*.jsonl"))
        lines = len(journal.read_text().splitlines())
        assert lines <= 3 + 1 + 8 + 1, lines
    c.close()
    c = custodian.Custodian(cfg)
    try:
        restore.restore(c)
        assert sorted(c.groups["g"].ledger.requests) == ["r57", "r58", "r59"]
    finally:
        c.delete_group("g")
        c.close()


def _anon_rss(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


async def _hostile(address: str, clients: int, message: int) -> dict[str, int]:
    """`clients` concurrent calls, each a maximal message: token lists and slot lists at the size
    limit, and garbage. Returns how many ended with each status code."""
    n = message - 64  # packed 1-byte varints: one value per byte
    raw = [
        pb.RecordTokensRequest(
            group="g", request_id="r", prompt_tokens=1, token_ids=[1] * n
        ).SerializeToString(),
        pb.CommitChunkRequest(group="g", rank=0, request_id="r", slots=[1] * n).SerializeToString(),
        b"\xff" * n,
    ]
    codes: dict[str, int] = {}
    channels = [grpc.aio.insecure_channel(address) for _ in range(10)]
    try:

        async def one(i: int) -> None:
            method = ("RecordTokens", "CommitChunk", "Attach")[i % 3]
            call = channels[i % len(channels)].unary_unary(f"/ghostserve.v1.Sidecar/{method}")
            try:
                await call(raw[i % 3], timeout=120)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one(i) for i in range(clients)))
    finally:
        for ch in channels:
            await ch.close()
    return codes


def soak(
    workdir: pathlib.Path,
    prefix: str,
    *,
    clients: int,
    message: str,
    message_bytes: int,
    inflight_mib: int = 64,
) -> None:
    budget, inflight, concurrent = 32 << 20, inflight_mib << 20, 16
    sc = kv.start_sidecar(
        workdir,
        "--budget", "32MiB",
        "--max-message-bytes", message,
        "--max-inflight-bytes", f"{inflight_mib}MiB",
        "--max-concurrent-rpcs", str(concurrent),
        prefix=prefix,
    )  # fmt: skip
    try:
        with sc.client(timeout=20) as c:
            for r in range(N):
                c.attach(
                    group="g", rank=r, world_size=N, layout=kv.LAYOUT, protection=kv.protection("xor", 1)
                )
        baseline = _anon_rss(sc.proc.pid)
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _anon_rss(sc.proc.pid))
                done.wait(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            codes = asyncio.run(_hostile(sc.address, clients, message_bytes))
        finally:
            done.set()
            sampler.join()
        assert set(codes) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"}, codes
        assert sum(codes.values()) == clients
        # Stated overhead: grpc holds at most `concurrent` received messages (x2 for its buffers), the
        # decode gate `inflight`, the budget the ledger; 128 MiB for the allocator's slack (glibc arenas of
        # the servicer threads keep freed memory).
        bound = baseline + budget + inflight + concurrent * message_bytes * 2 + (128 << 20)
        mib = {k: v >> 20 for k, v in {"baseline": baseline, "peak": peak[0], "bound": bound}.items()}
        print(f"soak: {clients} clients x {message_bytes} B: RssAnon MiB {mib}, codes {codes}")
        assert peak[0] <= bound
        with sc.client(timeout=20) as c:
            assert c.health() == 1
            c.delete_group(group="g")
    finally:
        assert sc.terminate() == 0


def test_soak_200_hostile_clients_stay_within_budget(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    soak(short_tmp, shm_prefix, clients=200, message="1MiB", message_bytes=1 << 20)


@pytest.mark.slow
def test_soak_200_hostile_clients_with_default_message_limit(
    short_tmp: pathlib.Path, shm_prefix: str
) -> None:
    soak(short_tmp, shm_prefix, clients=200, message="4MiB", message_bytes=4 << 20, inflight_mib=256)

