"""CommitChunks: several chunks of one rank in one call, committed exactly as CommitChunk commits them,
with a result per chunk; errors of the call itself commit nothing."""

from __future__ import annotations

import pathlib

import grpc
import inproc
import kv
import numpy as np
import pytest
from ghostserve.sidecar import client, config, pools, service
from ghostserve.v1 import sidecar_pb2 as pb

N = 3
CODES = {code.value[0]: code for code in grpc.StatusCode}


def attach_all(c: client.SidecarClient, group: str, budget: int = 0) -> list[np.ndarray]:
    out = []
    for r in range(N):
        reply = c.attach(
            group=group,
            rank=r,
            world_size=N,
            layout=kv.LAYOUT,
            protection=kv.protection("xor", 1),
            parity_budget_bytes=budget,
        )
        _mm, pool = pools.map_pool(reply.pool)
        pool[:] = kv.pool_content(10 + r, pool.size)
        out.append(pool)
    return out


def chunk(rid: str, idx: int, *, base: int | None = None) -> pb.ChunkCommit:
    start = idx * kv.CHUNK if base is None else base
    return pb.ChunkCommit(
        request_id=rid,
        chunk_index=idx,
        slots=list(range(start, start + kv.CHUNK)),
        token_ids=list(range(100 * idx, 100 * idx + kv.CHUNK)),
    )


def codes(reply: pb.CommitChunksResponse) -> list[grpc.StatusCode]:
    return [CODES[r.code] for r in reply.results]


def test_a_batch_protects_what_single_commits_protect_and_rebuilds_bit_exact(
    short_tmp: pathlib.Path, shm_prefix: str
) -> None:
    cfg = config.Config(budget_bytes=8 << 20, fake_gpus=N, shm_prefix=shm_prefix)
    with inproc.served(short_tmp, cfg) as c:
        batched, single = attach_all(c, "b"), attach_all(c, "s")
        for r in range(N):
            reply = c.commit_chunks(group="b", rank=r, chunks=[chunk("q", i) for i in range(4)])
            assert codes(reply) == [grpc.StatusCode.OK] * 4
            expect = pb.WAITING_FOR_RANKS if r < N - 1 else None
            if expect is not None:
                assert [x.state for x in reply.results] == [expect] * 4
            for i in range(4):
                one = chunk("q", i)
                c.commit_chunk(
                    group="s", rank=r, request_id="q", chunk_index=i, slots=one.slots, token_ids=one.token_ids
                )
        assert c.flush("b", wait=30).drained and c.flush("s", wait=30).drained
        b, s = c.describe_request(group="b", request_id="q"), c.describe_request(group="s", request_id="q")
        assert [x.state for x in b.chunks] == [pb.PROTECTED] * 4
        assert [(x.chunk_index, x.state, list(x.slots)) for x in b.chunks] == [
            (x.chunk_index, x.state, list(x.slots)) for x in s.chunks
        ]
        tokens = [t for i in range(4) for t in chunk("q", i).token_ids]
        assert list(b.token_ids) == list(s.token_ids) == tokens
        slots = list(range(4 * kv.CHUNK))
        want = kv.shard(batched[1], slots)
        c.mark_lost(group="b", ranks=[1], reason="test")
        report = c.rebuild(group="b", lost_ranks=[1])
        assert report.bytes_rebuilt == 4 * kv.CHUNK * kv.ROW_BYTES * 2 * kv.LAYOUT.layers
        _mm, rebuilt = pools.map_pool(c.describe_group(group="b").ranks[1].pool)
        assert np.array_equal(kv.shard(rebuilt, slots), want)
        del single
        for g in ("b", "s"):
            c.delete_group(group=g)


def test_one_bad_chunk_fails_alone(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    cfg = config.Config(budget_bytes=8 << 20, fake_gpus=N, shm_prefix=shm_prefix)
    with inproc.served(short_tmp, cfg) as c:
        attach_all(c, "g")
        out_of_range = pb.ChunkCommit(request_id="q", chunk_index=1, slots=[10_000] * kv.CHUNK)
        short = pb.ChunkCommit(request_id="q", chunk_index=3, slots=[1, 2])
        too_many = pb.ChunkCommit(request_id="q", chunk_index=4, slots=[0] * (service.MAX_SLOTS + 1))
        moved = chunk("q", 0, base=5 * kv.CHUNK)  # chunk 0 again, other slots: a bookkeeping bug
        batch = [chunk("q", 0), out_of_range, chunk("q", 2), short, too_many, moved]
        reply = c.commit_chunks(group="g", rank=0, chunks=batch)
        got = codes(reply)
        assert got[0] == got[2] == grpc.StatusCode.OK
        assert got[1] == got[3] == got[4] == got[5] == grpc.StatusCode.INVALID_ARGUMENT
        assert "slots" in reply.results[4].message and reply.results[1].message
        ledger = c.describe_request(group="g", request_id="q")
        assert sorted(x.chunk_index for x in ledger.chunks) == [0, 2]
        assert list(ledger.chunks[0].slots) == list(range(kv.CHUNK))  # the repeat changed nothing
        c.delete_group(group="g")


def test_errors_of_the_call_commit_nothing(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    cfg = config.Config(budget_bytes=8 << 20, fake_gpus=N, shm_prefix=shm_prefix)
    with inproc.served(short_tmp, cfg) as c:
        attach_all(c, "g")
        cases = [
            ({"group": "nope", "rank": 0}, grpc.StatusCode.NOT_FOUND),
            ({"group": "g", "rank": N}, grpc.StatusCode.INVALID_ARGUMENT),
        ]
        c.detach(group="g", rank=1)
        cases.append(({"group": "g", "rank": 1}, grpc.StatusCode.FAILED_PRECONDITION))
        for where, code in cases:
            with pytest.raises(grpc.RpcError) as err:
                c.commit_chunks(chunks=[chunk("q", 0)], **where)
            assert err.value.code() == code, where
        with pytest.raises(grpc.RpcError) as err:
            c.commit_chunks(group="g", rank=0, chunks=[chunk("q", 0)] * (service.MAX_BATCH_CHUNKS + 1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            c.describe_request(group="g", request_id="q")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was committed
        assert list(c.commit_chunks(group="g", rank=0, chunks=[]).results) == []
        c.delete_group(group="g")


def test_a_full_budget_is_reported_per_chunk_and_the_chunk_stays_committed(
    short_tmp: pathlib.Path, shm_prefix: str
) -> None:
    shard_bytes = kv.CHUNK * kv.ROW_BYTES * 2 * kv.LAYOUT.layers
    cfg = config.Config(budget_bytes=8 << 20, fake_gpus=N, shm_prefix=shm_prefix)
    with inproc.served(short_tmp, cfg) as c:
        attach_all(c, "g", budget=2 * shard_bytes)  # the group's parity budget: two chunks of xor
        for r in range(N - 1):
            c.commit_chunks(group="g", rank=r, chunks=[chunk("q", i) for i in range(4)])
        reply = c.commit_chunks(group="g", rank=N - 1, chunks=[chunk("q", i) for i in range(4)])
        got = codes(reply)
        assert got == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert c.flush("g", wait=30).drained
        ledger = c.describe_request(group="g", request_id="q")
        assert sorted(x.chunk_index for x in ledger.chunks) == [0, 1, 2, 3]  # every chunk is committed
        states = {x.chunk_index: x.state for x in ledger.chunks}
        for i, code in enumerate(got):
            assert (states[i] == pb.PROTECTED) == (code == grpc.StatusCode.OK), (i, code, states)
        c.delete_group(group="g")


def test_the_ledger_charge_is_what_the_ledger_holds(shm_prefix: str) -> None:
    """Each commit charges the budget by what it adds to its request (O(1) per commit); the total always
    equals the whole ledger's cost, including repeats, late token ids and rejected chunks."""
    from ghostserve.sidecar import commits, convert, core, errors

    c = core.Custodian(config.Config(budget_bytes=8 << 20, fake_gpus=0, shm_prefix=shm_prefix))
    try:
        settings = convert.settings_from(
            pb.AttachRequest(group="g", world_size=N, layout=kv.LAYOUT, protection=kv.protection("none"))
        )
        for r in range(N):
            c.attach("g", r, settings, worker_id=f"w{r}", identity="uid:0")

        def holds() -> int:
            return sum(commits.request_cost(q) for q in c.groups["g"].ledger.requests.values())

        none = np.zeros(0, np.int64)
        for i in range(6):
            slots = np.arange(i * kv.CHUNK, (i + 1) * kv.CHUNK, dtype=np.int64)
            tokens = np.arange(kv.CHUNK, dtype=np.int64) + i
            c.commit_chunk("g", 0, "q", i, slots=slots, token_ids=none)  # token ids come later
            c.commit_chunk("g", 1, "q", i, slots=slots, token_ids=tokens)
            c.commit_chunk("g", 1, "q", i, slots=slots, token_ids=tokens)  # a repeat
            with pytest.raises(errors.InvalidArgument):
                c.commit_chunk("g", 2, "q", i, slots=slots + 1, token_ids=tokens)
            assert c.store.meta_bytes == holds()
        c.release_request("g", "q")
        assert c.store.meta_bytes == holds() == 0
    finally:
        c.close()
