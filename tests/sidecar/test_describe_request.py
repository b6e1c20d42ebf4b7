"""DescribeRequest against a real sidecar process and real worker processes: the ledger it returns is
what the workers committed, and after MarkLost + Rebuild only chunks whose KV is back are valid."""

from __future__ import annotations

import pathlib

import grpc
import kv
import numpy as np
import pytest
from ghostserve.sidecar import pools
from ghostserve.v1 import sidecar_pb2 as pb
from test_service_process import make_plan, spawn

GROUP, N = "ns/resume-g0", 3


def chunk_view(reply: pb.RequestLedger) -> dict[int, tuple[list[int], int, bool]]:
    return {c.chunk_index: (list(c.slots), c.state, c.kv_valid) for c in reply.chunks}


def worker_tokens(index: int) -> list[int]:
    """The token ids worker.py commits with chunk `index`."""
    return [1000 * index + t for t in range(kv.CHUNK)]


def test_describe_request_follows_commits_loss_and_rebuild(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    sc = kv.start_sidecar(short_tmp, "--budget", "64MiB", prefix=shm_prefix)
    plan = make_plan(3, {"req-a": 3, "req-b": 2, "spare": 2})
    spare = [slots for _, slots in plan.pop("spare")]  # slots no worker commits
    workers = [spawn(sc, GROUP, r, N, "xor", 1, "write", plan) for r in range(N)]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == b"committed"
        with sc.client(timeout=30) as c:
            assert c.flush(GROUP, wait=30).drained
            # Rank 0 of an engine records the request's tokens (a tail past the chunks included).
            tokens = list(range(7, 7 + 3 * kv.CHUNK + 5))
            c.record_tokens(
                group=GROUP, request_id="req-a", token_ids=tokens, prompt_tokens=20, max_new_tokens=100
            )
            # A chunk only rank 0 committed so far.
            c.commit_chunk(group=GROUP, rank=0, request_id="req-b", chunk_index=2, slots=spare[0])

            a = c.describe_request(group=GROUP, request_id="req-a")
            assert (a.group, a.request_id, a.chunk_tokens) == (GROUP, "req-a", kv.CHUNK)
            assert list(a.token_ids) == tokens and a.prompt_tokens == 20 and a.max_new_tokens == 100
            assert chunk_view(a) == {i: (s, pb.PROTECTED, True) for i, s in plan["req-a"]}
            b = c.describe_request(group=GROUP, request_id="req-b")
            # Nothing recorded: the committed chunks' token ids stand in; no budget known.
            assert list(b.token_ids) == worker_tokens(0) + worker_tokens(1)
            assert b.prompt_tokens == 0 and b.max_new_tokens == 0
            assert chunk_view(b) == {
                **{i: (s, pb.PROTECTED, True) for i, s in plan["req-b"]},
                2: (spare[0], pb.WAITING_FOR_RANKS, False),
            }

            # Rank 1's GPU fails: no chunk's KV is complete on every rank any more.
            c.mark_lost(group=GROUP, ranks=[1], reason="Xid 79")
            for rid in ("req-a", "req-b"):
                assert not any(ch.kv_valid for ch in c.describe_request(group=GROUP, request_id=rid).chunks)
            # A chunk every rank commits while rank 1's pool is invalid gets no parity.
            for r in range(N):
                c.commit_chunk(group=GROUP, rank=r, request_id="req-a", chunk_index=3, slots=spare[1])
            a = c.describe_request(group=GROUP, request_id="req-a")
            assert chunk_view(a)[3] == (spare[1], pb.UNPROTECTED, False)

            # Rebuild req-a only, recomputing its chunk 0: chunks 1 and 2 come back, chunk 3 cannot.
            report = c.rebuild(group=GROUP, lost_ranks=[1], request_ids=["req-a"], first_chunk={"req-a": 1})
            (res,) = report.requests
            assert sorted(res.rebuilt_chunks) == [1, 2]
            assert [(f.chunk_index, f.reason) for f in res.failed_chunks] == [(3, pb.NOT_PROTECTED)]

            a = c.describe_request(group=GROUP, request_id="req-a")
            assert chunk_view(a) == {i: (s, pb.PROTECTED, True) for i, s in plan["req-a"] if i >= 1}
            assert list(a.token_ids) == tokens
            b = c.describe_request(group=GROUP, request_id="req-b")
            # Not rebuilt: rank 1's pool is valid again, but these chunks' KV on it is not.
            assert [(ch.chunk_index, ch.kv_valid) for ch in b.chunks] == [(0, False), (1, False), (2, False)]

            # Valid means the bytes are there: rank 1's pool holds what its worker wrote at valid chunks.
            desc = c.describe_group(group=GROUP)
            mm, pool = pools.map_pool(desc.ranks[1].pool)
            try:
                want = kv.pool_content(1, pool.size)
                for ch in a.chunks:
                    assert np.array_equal(kv.shard(pool, list(ch.slots)), kv.shard(want, list(ch.slots)))
                for ch in b.chunks:
                    assert not kv.shard(pool, list(ch.slots)).any()
            finally:
                del pool
                mm.close()

            # Unknown group or request: NOT_FOUND; a malformed request id: INVALID_ARGUMENT.
            for group, rid, code in [
                ("nope", "req-a", grpc.StatusCode.NOT_FOUND),
                (GROUP, "unknown", grpc.StatusCode.NOT_FOUND),
                (GROUP, "", grpc.StatusCode.INVALID_ARGUMENT),
                (GROUP, "has space", grpc.StatusCode.INVALID_ARGUMENT),
                (GROUP, "x" * 300, grpc.StatusCode.INVALID_ARGUMENT),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    c.describe_request(group=group, request_id=rid)
                assert err.value.code() == code, (group, rid)
            c.delete_group(group=GROUP)
    finally:
        for w in workers:
            if w.poll() is None:
                w.communicate(timeout=30)
        sc.terminate()
