"""The grpc.aio client against a real server, plus metrics exposition."""

from __future__ import annotations

import pathlib

import grpc
import inproc
import kv
import pytest
from ghostserve.sidecar import client, config
from ghostserve.v1 import sidecar_pb2 as pb


@pytest.mark.asyncio
async def test_async_client_round_trip(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    bg = inproc.Background(inproc.unix_address(short_tmp), config.Config(fake_gpus=1, shm_prefix=shm_prefix))
    try:
        async with client.AsyncSidecarClient(inproc.unix_address(short_tmp), timeout=20) as c:
            assert await c.health("ghostserve.v1.Sidecar") == 1
            for r in range(2):
                reply = await c.attach(
                    group="a",
                    rank=r,
                    world_size=2,
                    layout=kv.LAYOUT,
                    protection=kv.protection("rs", 1),
                    worker_id=f"w{r}",
                )
                assert reply.created and reply.pool.kind == "cpu" and reply.pool.row_bytes == kv.ROW_BYTES
            states = [
                (
                    await c.commit_chunk(
                        group="a", rank=r, request_id="q", chunk_index=0, slots=list(range(16))
                    )
                ).state
                for r in range(2)
            ]
            assert states == [pb.WAITING_FOR_RANKS, pb.QUEUED]
            await c.record_tokens(group="a", request_id="q", token_ids=list(range(20)), prompt_tokens=12)
            assert (await c.flush("a", wait=30)).drained
            plan = await c.plan_recovery(group="a", lost_ranks=[0])
            assert [
                (p.total_chunks, p.recompute_chunks, list(p.rebuild_chunks), p.tail_tokens)
                for p in plan.requests
            ] == [(1, 0, [0], 4)]
            await c.detach(group="a", rank=1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.commit_chunk(
                    group="a", rank=1, request_id="q", chunk_index=1, slots=list(range(16, 32))
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            desc = await c.describe_group(group="a")
            assert [r.attached for r in desc.ranks] == [True, False] and desc.requests[0].prompt_tokens == 12
            led = await c.describe_request(group="a", request_id="q")
            assert list(led.token_ids) == list(range(20)) and led.prompt_tokens == 12
            assert [(ch.chunk_index, list(ch.slots), ch.state, ch.kv_valid) for ch in led.chunks] == [
                (0, list(range(16)), pb.PROTECTED, True)
            ]
            pieces = [p async for p in c.stream_rebuild(group="a", lost_ranks=[1], rank=1)]
            assert [(p.chunk_index, p.shard_nbytes) for p in pieces] == [(0, 4096)]
            stats = await c.get_stats()
            assert stats.chunks_protected == 1 and stats.parity_bytes_held == 4096 and stats.groups == 1
            assert (await c.release_request(group="a", request_id="q")).freed_bytes == 4096
            assert list((await c.list_groups()).groups) == ["a"]
            await c.inject_fault(gpu_index=0, kind=pb.GPU_LOST)
            await c.delete_group(group="a")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.describe_group(group="a")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        text = bg.server.custodian.metrics.exposition().decode()
        assert "ghostserve_chunks_protected_total 1.0" in text
        assert 'ghostserve_health_events_total{kind="GPU_LOST"} 1.0' in text
        assert "ghostserve_parity_bytes_held 0.0" in text
    finally:
        bg.stop()


def test_stream_splits_large_shards_into_pieces_of_at_most_4_mib(
    short_tmp: pathlib.Path, shm_prefix: str
) -> None:
    import numpy as np
    from ghostserve.kernels import layout as kvlayout
    from ghostserve.sidecar import pools, transfer

    # 4 layers x 8 heads x 128 dims fp16, 256-token chunks: 4 MiB shards, more than one piece each.
    lay = kvlayout.KVLayout(4, 8, 128, "float16", 16, 512)
    msg = pb.KVLayout(layers=4, kv_heads=8, head_dim=128, dtype=pb.FLOAT16, page_size=16, pool_slots=512)
    bg = inproc.Background(inproc.unix_address(short_tmp), config.Config(fake_gpus=0, shm_prefix=shm_prefix))
    try:
        with client.SidecarClient(inproc.unix_address(short_tmp), timeout=60) as c:
            maps = []
            for r in range(2):
                h = c.attach(
                    group="big", rank=r, world_size=2, layout=msg, protection=kv.protection("xor", 1, 256)
                )
                mm, pool = pools.map_pool(h.pool)
                pool[:] = kv.pool_content(r, pool.size)
                maps.append((mm, pool))
            slots = list(range(256, 512))
            for r in range(2):
                c.commit_chunk(group="big", rank=r, request_id="q", chunk_index=0, slots=slots)
            assert c.flush("big", wait=60).drained
            pieces = list(c.stream_rebuild(group="big", lost_ranks=[0], rank=0))
            assert len(pieces) == 2 and all(p.ByteSize() <= 4 * 2**20 for p in pieces)
            assert [p.offset for p in pieces] == [0, len(pieces[0].data)]
            local = np.zeros(lay.pool_nbytes, dtype=np.uint8)
            got = transfer.receive_into_pool(pieces, local, lay)
            assert got.written == {"q": [0]} and got.bytes_written == lay.shard_nbytes(256)
            assert np.array_equal(kv.shard(local, slots, layout=msg), kv.shard(maps[0][1], slots, layout=msg))
            del maps
            c.delete_group(group="big")
    finally:
        bg.stop()
