"""Bad input never crashes the sidecar or changes its state: hypothesis drives every RPC with wrong
sizes, unknown ids, out-of-range slots and ranks and huge messages; clients die mid-stream."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Iterator

import grpc
import inproc
import kv
import numpy as np
import pytest
from ghostserve.sidecar import client, config, pools
from ghostserve.v1 import sidecar_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GROUP, N = "fz", 3
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
}


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[inproc.Background, client.SidecarClient]]:
    import secrets
    import tempfile

    d = pathlib.Path(tempfile.mkdtemp(prefix="gs-", dir="/tmp"))
    prefix = f"gs-t{secrets.token_hex(3)}-"
    cfg = config.Config(budget_bytes=8 << 20, fake_gpus=2, max_pool_bytes=1 << 20, shm_prefix=prefix)
    bg = inproc.Background(inproc.unix_address(d), cfg)
    c = client.SidecarClient(inproc.unix_address(d), timeout=20)
    maps = []
    for r in range(N):
        reply = c.attach(
            group=GROUP, rank=r, world_size=N, layout=kv.LAYOUT, protection=kv.protection("xor", 1)
        )
        mm, pool = pools.map_pool(reply.pool)
        pool[:] = kv.pool_content(r, pool.size)
        maps.append((mm, pool))
    for idx in range(2):
        for r in range(N):
            c.commit_chunk(
                group=GROUP,
                rank=r,
                request_id="seed",
                chunk_index=idx,
                slots=list(range(idx * kv.CHUNK, (idx + 1) * kv.CHUNK)),
            )
    assert c.flush(GROUP, wait=30).drained
    try:
        yield bg, c
    finally:
        del maps
        c.close()
        bg.stop()
        assert not list(pathlib.Path("/dev/shm").glob(prefix + "*"))
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink()
        d.rmdir()


def snapshot(c: client.SidecarClient) -> tuple[bytes, list[str], bytes]:
    try:
        seed = c.describe_request(group=GROUP, request_id="seed").SerializeToString(deterministic=True)
    except grpc.RpcError as exc:
        seed = str(exc.code()).encode()
    desc = c.describe_group(group=GROUP).SerializeToString(deterministic=True)
    return desc, list(c.list_groups().groups), seed


def call(c: client.SidecarClient, method: str, request: object) -> grpc.StatusCode:
    try:
        if method == "flush":
            c._stub.Flush(request, timeout=30)  # the raw stub: fuzz timeout_seconds itself
        else:
            reply = getattr(c, method)(request)
            if method == "stream_rebuild":
                list(reply)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


u32 = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))
i64 = st.integers(-(2**63), 2**63 - 1)
names = st.one_of(st.just(GROUP), st.just("nope"), st.text(max_size=30), st.just("x" * 300))
rids = st.one_of(st.just("seed"), st.text(max_size=20), st.just("y" * 300))
slots = st.lists(u32, max_size=40)
layouts = st.builds(
    pb.KVLayout,
    layers=u32,
    kv_heads=u32,
    head_dim=u32,
    dtype=st.integers(0, 6),
    page_size=u32,
    pool_slots=u32,
)
prots = st.builds(pb.Protection, code=st.integers(0, 7), parity_shards=u32, chunk_tokens=u32)

REQUESTS = st.one_of(
    st.tuples(
        st.just("attach"),
        st.builds(
            pb.AttachRequest,
            group=names,
            rank=u32,
            world_size=u32,
            layout=st.one_of(layouts, st.just(kv.LAYOUT)),
            protection=prots,
        ),
    ),
    st.tuples(
        st.just("commit_chunk"),
        st.builds(
            pb.CommitChunkRequest,
            group=names,
            rank=u32,
            request_id=rids,
            chunk_index=u32,
            slots=slots,
            token_ids=st.lists(i64, max_size=20),
        ),
    ),
    st.tuples(
        st.just("record_tokens"),
        st.builds(
            pb.RecordTokensRequest,
            group=names,
            request_id=rids,
            token_ids=st.lists(i64, max_size=20),
            prompt_tokens=u32,
            max_new_tokens=u32,
        ),
    ),
    st.tuples(
        st.just("release_request"),
        st.builds(pb.ReleaseRequestRequest, group=st.just("nope"), request_id=rids),
    ),
    st.tuples(
        st.just("release_request"),
        st.builds(pb.ReleaseRequestRequest, group=st.just(GROUP), request_id=st.text(max_size=5)),
    ),
    st.tuples(st.just("describe_group"), st.builds(pb.DescribeGroupRequest, group=names)),
    st.tuples(
        st.just("describe_request"), st.builds(pb.DescribeRequestRequest, group=names, request_id=rids)
    ),
    st.tuples(st.just("detach"), st.builds(pb.DetachRequest, group=st.just("nope"), rank=u32)),
    st.tuples(st.just("delete_group"), st.builds(pb.DeleteGroupRequest, group=st.text(max_size=5))),
    st.tuples(
        st.just("mark_lost"),
        st.builds(
            pb.MarkLostRequest, group=names, ranks=st.lists(st.integers(N, 2**32 - 1), min_size=1, max_size=3)
        ),
    ),
    st.tuples(
        st.just("plan_recovery"),
        st.builds(
            pb.PlanRecoveryRequest,
            group=names,
            lost_ranks=st.lists(u32, max_size=4),
            prefill_tokens_per_s=st.floats(),
            rebuild_bytes_per_s=st.floats(),
        ),
    ),
    st.tuples(
        st.just("rebuild"),
        st.builds(
            pb.RebuildRequest,
            group=names,
            lost_ranks=st.lists(st.integers(N, 2**32 - 1), max_size=3),
            request_ids=st.lists(rids, max_size=3),
        ),
    ),
    st.tuples(
        st.just("stream_rebuild"),
        st.builds(
            pb.StreamRebuildRequest,
            group=names,
            lost_ranks=st.lists(u32, max_size=3),
            rank=u32,
            request_ids=st.lists(rids, max_size=2),
            first_chunk=st.dictionaries(rids, u32, max_size=2),
        ),
    ),
    st.tuples(
        st.just("flush"),
        st.builds(pb.FlushRequest, group=names, timeout_seconds=st.floats(max_value=0.05)),
    ),
    st.tuples(
        st.just("inject_fault"),
        st.builds(pb.InjectFaultRequest, gpu_index=u32, kind=st.integers(0, 9), xid=u32),
    ),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(REQUESTS)
def test_fuzzed_requests_get_clean_codes_and_failures_change_nothing(served, req) -> None:
    _, c = served
    method, message = req
    before = snapshot(c)
    code = call(c, method, message)
    assert code in ALLOWED, (method, message, code)
    read_only = (
        "describe_group",
        "describe_request",
        "plan_recovery",
        "inject_fault",
        "detach",
        "stream_rebuild",
        "flush",
    )
    if code != grpc.StatusCode.OK or method in read_only:
        assert snapshot(c) == before, (method, message, code)
    assert c.health() == 1


CHUNK_COMMITS = st.builds(
    pb.ChunkCommit,
    request_id=rids,
    chunk_index=u32,
    slots=st.one_of(slots, st.just(list(range(kv.CHUNK)))),
    token_ids=st.lists(i64, max_size=20),
)
STATUS = {code.value[0]: code for code in grpc.StatusCode}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.builds(
        pb.CommitChunksRequest,
        group=names,
        rank=u32,
        chunks=st.lists(CHUNK_COMMITS, max_size=6),
    )
)
def test_fuzzed_commit_batches_get_a_clean_code_per_chunk(served, request) -> None:
    """Each chunk of a batch gets a code CommitChunk could give; chunks that fail change nothing."""
    _, c = served
    before = snapshot(c)
    try:
        reply = c.commit_chunks(request)
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED - {grpc.StatusCode.OK}, exc.code()
        assert snapshot(c) == before
        return
    assert len(reply.results) == len(request.chunks)
    got = [STATUS[r.code] for r in reply.results]
    assert set(got) <= ALLOWED, got
    if grpc.StatusCode.OK not in got:
        assert snapshot(c) == before, got
    assert c.health() == 1


def test_huge_messages_are_refused_and_the_server_stays_healthy(served) -> None:
    _, c = served
    before = snapshot(c)
    too_many = pb.CommitChunkRequest(
        group=GROUP, rank=0, request_id="h", chunk_index=0, slots=[1] * 1_100_000
    )
    assert call(c, "commit_chunk", too_many) == grpc.StatusCode.INVALID_ARGUMENT
    too_big = pb.RecordTokensRequest(group=GROUP, request_id="h", token_ids=[2**62] * 3_000_000)
    assert call(c, "record_tokens", too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert snapshot(c) == before and c.health() == 1


def test_clients_dying_mid_stream(served) -> None:
    _, c = served
    # A client that cancels after the first piece...
    stream = c.stream_rebuild(group=GROUP, lost_ranks=[1], rank=1)
    first = next(stream)
    stream.cancel()
    assert first.shard_nbytes == 4096
    # ...and a client process SIGKILLed while the stream is open.
    script = (
        "import os, signal, sys; from ghostserve.sidecar import client\n"
        f"c = client.SidecarClient({c.address!r})\n"
        f"s = c.stream_rebuild(group={GROUP!r}, lost_ranks=[1], rank=1); next(s)\n"
        "print('got', flush=True); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9 and b"got" in proc.stdout
    pieces = list(c.stream_rebuild(group=GROUP, lost_ranks=[1], rank=1))
    assert [p.chunk_index for p in pieces] == [0, 1]
    want = kv.pool_content(1, kv.LAYOUT.layers * 2 * kv.LAYOUT.pool_slots * kv.ROW_BYTES)
    got = np.frombuffer(pieces[1].data, dtype=np.uint8).reshape(4, kv.CHUNK, kv.ROW_BYTES)
    assert np.array_equal(got, kv.shard(want, list(range(kv.CHUNK, 2 * kv.CHUNK))))
    assert c.health() == 1


UNARY = [
    m.name
    for m in pb.DESCRIPTOR.services_by_name["Sidecar"].methods
    if not m.client_streaming and not m.server_streaming and m.name not in ("MoveGroup",)
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(UNARY), raw=st.binary(max_size=200))
def test_fuzzed_raw_bytes_are_decoded_or_refused_cleanly(served, method: str, raw: bytes) -> None:
    """Any bytes on the wire: INVALID_ARGUMENT when they do not decode (issue 13: UNKNOWN plus an
    ERROR traceback for 781 of 5,000 calls), else whatever the decoded message deserves."""
    _, c = served
    with grpc.insecure_channel(c.address) as ch:
        try:
            ch.unary_unary(f"/ghostserve.v1.Sidecar/{method}")(raw, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    assert code in ALLOWED, (method, raw, code)
    assert c.health() == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 400_000), min_size=1, max_size=6))
def test_fuzzed_token_lists_stay_within_the_budget(served, sizes: list[int]) -> None:
    """RecordTokens is charged to the budget (8 MiB here): lists that do not fit are refused with
    RESOURCE_EXHAUSTED and change nothing; what was accepted never takes the sidecar past it."""
    _, c = served
    accepted = []
    for i, n in enumerate(sizes):
        rid = f"tok{i}"
        before = snapshot(c)
        req = pb.RecordTokensRequest(group=GROUP, request_id=rid, token_ids=[3] * n, prompt_tokens=0)
        code = call(c, "record_tokens", req)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), code
        if code == grpc.StatusCode.OK:
            accepted.append(n)
        else:
            assert snapshot(c) == before
    assert sum(accepted) * 8 <= 8 << 20
    for i in range(len(sizes)):
        call(c, "release_request", pb.ReleaseRequestRequest(group=GROUP, request_id=f"tok{i}"))
