"""MoveGroup under faults: the source SIGKILLed mid-stream (restarted, it resumes where the target
stopped), and a target with no room for the group (refused at once, nothing staged or valid)."""

from __future__ import annotations

import pathlib

import grpc
import kv
import move_kit
import numpy as np
import pytest
from ghostserve.sidecar import pools

GROUP = "ns/demo-r1"


def test_source_killed_mid_move_resumes_after_restart(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    state = ["--state-dir", str(short_tmp / "src-state")]
    src_addr = f"127.0.0.1:{kv.free_port()}"
    src = kv.start_sidecar(short_tmp, *state, listen=src_addr, prefix=shm_prefix, name="src")
    dst = kv.start_sidecar(
        short_tmp, listen=f"127.0.0.1:{kv.free_port()}", prefix=shm_prefix + "t", name="dst"
    )
    total = 2 * move_kit.LAYOUT.pool_slots * 512 * 2 * move_kit.LAYOUT.layers
    proxy = move_kit.CuttingProxy(int(dst.address.rsplit(":", 1)[1]), cut_after=total // 2, stall=True)
    try:
        with src.client(timeout=60) as s:
            filled = move_kit.fill_group(s, GROUP, seed=9)
            uid = s.describe_group(group=GROUP).uid
        t, errors = move_kit.move_in_background(src.client, GROUP, proxy.port)  # one side dies under it
        assert proxy.cut.wait(60)
        with dst.client(timeout=30) as d:
            kv.wait_until(lambda: d.get_stats().move_bytes_received > 0, what="the target to stage bytes")
            src.kill()  # SIGKILL mid-stream
            t.join(60)
            assert errors and isinstance(errors[0], grpc.RpcError)
            held = d.get_stats().move_bytes_received
            assert 0 < held < total
            with pytest.raises(grpc.RpcError) as missing:
                d.describe_group(group=GROUP)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

            # The restarted source re-adopts its pools and chunk records, then resumes the move.
            src = kv.start_sidecar(
                short_tmp, *state, listen=src_addr, prefix=shm_prefix, name="src2", ready_timeout=120
            )
            with src.client(timeout=60) as s:
                assert s.describe_group(group=GROUP).uid == uid
                reply = s.move_group(group=GROUP, target=dst.address, piece_bytes=128 * 1024)
            # >=: the target may have written pieces it had buffered after `held` was read.
            assert held <= reply.resumed_from_bytes < total and reply.bytes_moved < total
            got = move_kit.read_pools(d, GROUP)
            assert all(np.array_equal(a, b) for a, b in zip(got, filled.pools, strict=True))
            assert d.flush(GROUP, wait=60).drained
            desc = d.describe_group(group=GROUP)
            assert desc.uid == uid
            protected = {r.request_id: r.chunks_protected for r in desc.requests}
            assert protected == dict.fromkeys(filled.requests, 2)
    finally:
        proxy.close()
        dst.terminate()
        src.terminate()


def test_full_target_refuses_and_stages_nothing(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    src = kv.start_sidecar(short_tmp, listen=f"127.0.0.1:{kv.free_port()}", prefix=shm_prefix, name="src")
    group_bytes = 2 * move_kit.LAYOUT.pool_slots * 512 * 2 * move_kit.LAYOUT.layers
    dst = kv.start_sidecar(
        short_tmp,
        "--max-pool-bytes",
        str(group_bytes - 1),
        listen=f"127.0.0.1:{kv.free_port()}",
        prefix=shm_prefix + "t",
        name="dst",
    )
    try:
        with src.client(timeout=60) as s, dst.client(timeout=10) as d:
            move_kit.fill_group(s, GROUP, requests=1)
            with pytest.raises(grpc.RpcError) as full:
                s.move_group(group=GROUP, target=dst.address)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert full.value.details().startswith(f"target {dst.address}:")
            assert "max-pool-bytes" in full.value.details()
            assert sorted(pools.SHM_DIR.glob(shm_prefix + "t*")) == []
            assert d.list_groups().groups == [] and d.get_stats().moves_in_progress == 0
            with pytest.raises(grpc.RpcError) as missing:
                d.describe_group(group=GROUP)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert s.describe_group(group=GROUP).ranks[0].pool_valid  # the source keeps its copy
    finally:
        dst.terminate()
        src.terminate()


def test_target_killed_mid_move_frees_its_staging_on_restart(
    short_tmp: pathlib.Path, shm_prefix: str
) -> None:
    src = kv.start_sidecar(short_tmp, listen=f"127.0.0.1:{kv.free_port()}", prefix=shm_prefix, name="src")
    state = ["--state-dir", str(short_tmp / "dst-state")]
    dst_addr = f"127.0.0.1:{kv.free_port()}"
    dst_prefix = shm_prefix + "t"
    dst = kv.start_sidecar(short_tmp, *state, listen=dst_addr, prefix=dst_prefix, name="dst")
    total = 2 * move_kit.LAYOUT.pool_slots * 512 * 2 * move_kit.LAYOUT.layers
    proxy = move_kit.CuttingProxy(int(dst_addr.rsplit(":", 1)[1]), cut_after=total // 2, stall=True)
    try:
        with src.client(timeout=60) as s:
            filled = move_kit.fill_group(s, GROUP, seed=4)
        t, errors = move_kit.move_in_background(src.client, GROUP, proxy.port)  # one side dies under it
        assert proxy.cut.wait(60)
        with dst.client(timeout=30) as d:
            kv.wait_until(lambda: d.get_stats().move_bytes_received > 0, what="the target to stage bytes")
        assert len(list(pools.SHM_DIR.glob(dst_prefix + "*"))) == 2  # the two staged pools
        dst.kill()  # SIGKILL: no shutdown, the staged segments stay in /dev/shm
        proxy.close()
        t.join(60)
        assert errors and isinstance(errors[0], grpc.RpcError)

        dst = kv.start_sidecar(
            short_tmp, *state, listen=dst_addr, prefix=dst_prefix, name="dst2", ready_timeout=120
        )
        assert list(pools.SHM_DIR.glob(dst_prefix + "*")) == []  # freed at start
        with src.client(timeout=60) as s, dst.client(timeout=60) as d:
            assert d.get_stats().moves_in_progress == 0
            reply = s.move_group(group=GROUP, target=dst_addr)
            assert reply.resumed_from_bytes == 0
            got = move_kit.read_pools(d, GROUP)
            assert all(np.array_equal(a, b) for a, b in zip(got, filled.pools, strict=True))
    finally:
        proxy.close()
        dst.terminate()
        src.terminate()
