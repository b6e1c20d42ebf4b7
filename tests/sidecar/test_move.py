"""MoveGroup between two real sidecar processes over loopback TCP: the group's pools, ledger and tokens
arrive byte-exact, parity is recomputed at the target, a dropped connection resumes, and every refusal
(corrupt piece, full target, another deployment's group) leaves nothing valid behind."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import grpc
import kv
import move_kit
import numpy as np
import pytest
from ghostserve.kernels import checksums
from ghostserve.sidecar import client
from ghostserve.v1 import sidecar_pb2 as pb

GROUP = "ns/demo-r0"


@pytest.fixture
def pair(short_tmp: pathlib.Path, shm_prefix: str) -> Iterator[tuple[kv.Sidecar, kv.Sidecar]]:
    src = kv.start_sidecar(
        short_tmp, "--budget", "64MiB", listen=f"127.0.0.1:{kv.free_port()}", prefix=shm_prefix, name="src"
    )
    try:
        dst = kv.start_sidecar(
            short_tmp,
            "--budget",
            "64MiB",
            listen=f"127.0.0.1:{kv.free_port()}",
            prefix=shm_prefix,
            name="dst",
        )
        try:
            yield src, dst
        finally:
            assert dst.terminate() == 0
    finally:
        assert src.terminate() == 0


def code_of(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()


def assert_installed(dst: client.SidecarClient, filled: move_kit.Filled, uid: str) -> None:
    """The target holds the group: same uid, bytes, ledger and tokens; parity recomputed there."""
    desc = dst.describe_group(group=filled.group)
    assert desc.uid == uid
    assert [r.pool_valid for r in desc.ranks] == [True] * filled.world
    assert not any(r.attached for r in desc.ranks)
    got = move_kit.read_pools(dst, filled.group)
    assert all(np.array_equal(a, b) for a, b in zip(got, filled.pools, strict=True))
    assert dst.flush(filled.group, wait=60).drained
    desc = dst.describe_group(group=filled.group)
    assert {r.request_id: (r.chunks_committed, r.chunks_protected) for r in desc.requests} == {
        rid: (2, 2) for rid in filled.requests
    }
    for rid, tokens in filled.requests.items():
        led = dst.describe_request(group=filled.group, request_id=rid)
        assert list(led.token_ids) == tokens and led.prompt_tokens == 7 and led.max_new_tokens == 99
        assert [list(ch.slots) for ch in led.chunks] == filled.slots[rid]
        assert all(ch.kv_valid for ch in led.chunks)


def test_move_then_attach_on_target_and_rebuild_from_recomputed_parity(
    pair: tuple[kv.Sidecar, kv.Sidecar],
) -> None:
    src, dst = pair
    with src.client(timeout=60) as s, dst.client(timeout=60) as d:
        filled = move_kit.fill_group(s, GROUP)
        uid = s.describe_group(group=GROUP).uid
        with pytest.raises(grpc.RpcError) as missing:
            d.describe_group(group=GROUP)
        assert code_of(missing) == grpc.StatusCode.NOT_FOUND

        reply = s.move_group(group=GROUP, target=dst.address)
        total = sum(p.size for p in filled.pools)
        assert reply.ranks_moved == 2 and reply.requests_moved == 3
        assert reply.resumed_from_bytes == 0 and reply.bytes_moved > total
        assert_installed(d, filled, uid)
        assert d.get_stats().move_bytes_received == total

        # Idempotent: the target already holds the whole group.
        again = s.move_group(group=GROUP, target=dst.address)
        assert again.bytes_moved == 0 and again.resumed_from_bytes == total

        # The engine attaches on the target and finds its KV; the GPU is the target's own.
        for rank in range(2):
            att = d.attach(
                group=GROUP,
                rank=rank,
                world_size=2,
                layout=move_kit.LAYOUT,
                protection=move_kit.PROTECTION,
                worker_id=f"new-{rank}",
                device_uuid=f"GPU-dst-{rank}",
            )
            assert not att.created and not att.needs_rebuild
        assert [r.device_uuid for r in d.describe_group(group=GROUP).ranks] == ["GPU-dst-0", "GPU-dst-1"]

        # The parity at the target was computed from the moved KV: a lost rank rebuilds byte-exact.
        d.mark_lost(group=GROUP, ranks=[1], reason="test")
        report = d.rebuild(group=GROUP, lost_ranks=[1])
        assert all(not r.failed_chunks for r in report.requests) and report.bytes_rebuilt > 0
        rebuilt = move_kit.read_pools(d, GROUP)[1]
        for chunks in filled.slots.values():
            for slots in chunks:
                assert np.array_equal(kv.shard(rebuilt, slots, layout=move_kit.LAYOUT),
                                      kv.shard(filled.pools[1], slots, layout=move_kit.LAYOUT))
        # The source keeps its copy until the operator deletes it.
        assert s.describe_group(group=GROUP).uid == uid


def test_dropped_connection_resumes_from_what_the_target_holds(
    pair: tuple[kv.Sidecar, kv.Sidecar],
) -> None:
    src, dst = pair
    total = 2 * move_kit.LAYOUT.pool_slots * 512 * 2 * move_kit.LAYOUT.layers
    proxy = move_kit.CuttingProxy(int(dst.address.rsplit(":", 1)[1]), cut_after=total // 3)
    try:
        with src.client(timeout=60) as s, dst.client(timeout=60) as d:
            filled = move_kit.fill_group(s, GROUP, seed=5)
            assert sum(p.size for p in filled.pools) == total
            with pytest.raises(grpc.RpcError) as dropped:
                s.move_group(group=GROUP, target=f"127.0.0.1:{proxy.port}", piece_bytes=256 * 1024)
            assert code_of(dropped) == grpc.StatusCode.UNAVAILABLE
            assert proxy.cut.is_set()

            # Nothing of the group is valid or attachable on the target before the move finishes.
            with pytest.raises(grpc.RpcError) as missing:
                d.describe_group(group=GROUP)
            assert code_of(missing) == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as early:
                d.attach(group=GROUP, rank=0, world_size=2, layout=move_kit.LAYOUT,
                         protection=move_kit.PROTECTION, worker_id="too-early")
            assert code_of(early) == grpc.StatusCode.UNAVAILABLE
            stats = d.get_stats()
            assert stats.moves_in_progress == 1 and 0 < stats.move_bytes_received < total

            reply = s.move_group(group=GROUP, target=dst.address, piece_bytes=256 * 1024)
            # The target may still have been writing pieces it had buffered when the stats were read.
            assert stats.move_bytes_received <= reply.resumed_from_bytes < total
            assert reply.bytes_moved < total
            assert_installed(d, filled, s.describe_group(group=GROUP).uid)
            assert d.get_stats().moves_in_progress == 0
    finally:
        proxy.close()


def _header(c: client.SidecarClient, group: str) -> tuple[pb.MoveHeader, list[np.ndarray]]:
    desc = c.describe_group(group=group)
    pools = move_kit.read_pools(c, group)
    header = pb.MoveHeader(
        group=group,
        uid=desc.uid,
        world_size=desc.world_size,
        layout=desc.layout,
        protection=desc.protection,
        pool_checksums=[checksums.checksum(p) for p in pools],
    )
    return header, pools


def test_corrupt_pieces_and_pools_are_rejected_and_nothing_is_installed(
    pair: tuple[kv.Sidecar, kv.Sidecar],
) -> None:
    """A careless (or hostile) peer streams straight to ReceiveGroup."""
    src, dst = pair
    with src.client(timeout=60) as s, dst.client(timeout=60) as d:
        move_kit.fill_group(s, GROUP, requests=1)
        header, pools = _header(s, GROUP)
        data = pools[0][:65536].tobytes()

        def stream(*pieces: pb.MovePiece) -> pb.ReceiveGroupReply:
            return d.receive_group(iter([pb.MovePiece(header=header), *pieces]))

        probe = stream()
        assert (probe.received_bytes, probe.complete) == (0, False)
        assert probe.total_bytes == sum(p.size for p in pools)

        flipped = bytearray(data)
        flipped[100] ^= 1
        with pytest.raises(grpc.RpcError) as bad_sum:
            stream(pb.MovePiece(offset=0, data=bytes(flipped), checksum=checksums.checksum(data)))
        assert code_of(bad_sum) == grpc.StatusCode.DATA_LOSS
        assert stream().received_bytes == 0

        with pytest.raises(grpc.RpcError) as gap:
            stream(pb.MovePiece(offset=4096, data=data, checksum=checksums.checksum(data)))
        assert code_of(gap) == grpc.StatusCode.FAILED_PRECONDITION

        with pytest.raises(grpc.RpcError) as early:
            stream(pb.MovePiece(offset=0, data=data, checksum=checksums.checksum(data)),
                   pb.MovePiece(commit=True, ledger=b"", ledger_checksum=checksums.checksum(b"")))
        assert code_of(early) == grpc.StatusCode.FAILED_PRECONDITION
        assert stream().received_bytes == len(data)  # the good piece was kept

        # Every piece checks out but the pools do not match the header: the whole staging goes.
        wrong = pb.MoveHeader()
        wrong.CopyFrom(header)
        wrong.pool_checksums[1] ^= 1
        whole = b"".join(p.tobytes() for p in pools)
        body = [whole[i : i + (1 << 20)] for i in range(0, len(whole), 1 << 20)]  # messages < 4 MiB
        pieces = [pb.MovePiece(header=wrong)]
        off = 0
        for b in body:
            pieces.append(pb.MovePiece(offset=off, data=b, checksum=checksums.checksum(b)))
            off += len(b)
        pieces.append(pb.MovePiece(commit=True, ledger=b"", ledger_checksum=checksums.checksum(b"")))
        with pytest.raises(grpc.RpcError) as mismatch:
            d.receive_group(iter(pieces))
        assert code_of(mismatch) == grpc.StatusCode.DATA_LOSS
        assert d.get_stats().moves_in_progress == 0
        with pytest.raises(grpc.RpcError) as missing:
            d.describe_group(group=GROUP)
        assert code_of(missing) == grpc.StatusCode.NOT_FOUND

        # A stream without a header, and a header the sidecar could never hold, change nothing.
        with pytest.raises(grpc.RpcError) as headless:
            d.receive_group(iter([pb.MovePiece(offset=0, data=data)]))
        assert code_of(headless) == grpc.StatusCode.INVALID_ARGUMENT
        silly = pb.MoveHeader()
        silly.CopyFrom(header)
        silly.world_size = 0
        with pytest.raises(grpc.RpcError) as invalid:
            d.receive_group(iter([pb.MovePiece(header=silly)]))
        assert code_of(invalid) == grpc.StatusCode.INVALID_ARGUMENT
        assert d.list_groups().groups == [] and d.get_stats().moves_in_progress == 0

        # A hand-made but correct stream installs the group: pools, then the ledger in two parts.
        ledger = pb.MovedLedger(
            requests=[pb.MovedRequest(request_id="x", token_ids=list(range(70)), prompt_tokens=3)]
        ).SerializeToString()
        half = len(ledger) // 2
        pieces[0] = pb.MovePiece(header=header)
        pieces[-1:] = [
            pb.MovePiece(ledger=ledger[:half]),
            pb.MovePiece(ledger=ledger[half:], ledger_checksum=checksums.checksum(ledger), commit=True),
        ]
        assert d.receive_group(iter(pieces)).complete
        assert list(d.describe_request(group=GROUP, request_id="x").token_ids) == list(range(70))
        assert np.array_equal(move_kit.read_pools(d, GROUP)[1], pools[1])
        # Now the target holds it: the real move is a no-op.
        assert s.move_group(group=GROUP, target=dst.address).bytes_moved == 0


def test_source_sends_pools_then_the_ledger_in_parts() -> None:
    import asyncio

    from ghostserve.sidecar import move

    pools_ = [np.arange(10, dtype=np.uint8), np.arange(10, 20, dtype=np.uint8)]
    snap = move.Snapshot(pb.MoveHeader(group="g"), pools_, bytes(range(23)), 1)

    async def collect() -> list[pb.MovePiece | bytes]:
        return [p async for p in move._pieces(snap, 4, 8)]

    got = [p if isinstance(p, pb.MovePiece) else pb.MovePiece.FromString(p) for p in asyncio.run(collect())]
    assert got[0].header.group == "g"
    data = [p for p in got if p.data]
    assert [(p.offset, len(p.data)) for p in data] == [(4, 6), (10, 8), (18, 2)]
    assert all(p.checksum == checksums.checksum(p.data) for p in data)
    ledger = [p for p in got if p.ledger]
    assert b"".join(p.ledger for p in ledger) == snap.ledger and [len(p.ledger) for p in ledger] == [8, 8, 7]
    assert [p.commit for p in got[-3:]] == [False, False, True]
    assert got[-1].ledger_checksum == checksums.checksum(snap.ledger)


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 300, 2**40 + 5])
@pytest.mark.parametrize("size", [1, 127, 128, 20000])
def test_encoded_piece_equals_the_generated_encoding(offset: int, size: int) -> None:
    from ghostserve.sidecar import move

    data = np.random.default_rng(size).integers(0, 256, size + 8, dtype=np.uint8)[3 : 3 + size]
    wire = move.encode_piece(offset, data)
    ref = pb.MovePiece(offset=offset, data=data.tobytes(), checksum=checksums.checksum(data.tobytes()))
    assert pb.MovePiece.FromString(wire) == ref
    assert wire == ref.SerializeToString()


def test_target_holding_another_deployments_group_refuses(pair: tuple[kv.Sidecar, kv.Sidecar]) -> None:
    src, dst = pair
    with src.client(timeout=60) as s, dst.client(timeout=60) as d:
        move_kit.fill_group(s, GROUP, seed=1)
        theirs = move_kit.fill_group(d, GROUP, seed=2, requests=1)
        their_uid = d.describe_group(group=GROUP).uid
        with pytest.raises(grpc.RpcError) as refused:
            s.move_group(group=GROUP, target=dst.address)
        assert code_of(refused) == grpc.StatusCode.ALREADY_EXISTS
        assert "another deployment" in refused.value.details()
        desc = d.describe_group(group=GROUP)
        assert desc.uid == their_uid and [r.request_id for r in desc.requests] == ["req-0"]
        got = move_kit.read_pools(d, GROUP)
        assert all(np.array_equal(a, b) for a, b in zip(got, theirs.pools, strict=True))
        assert d.get_stats().moves_in_progress == 0


def test_source_refuses_invalid_ranks_and_bad_targets(pair: tuple[kv.Sidecar, kv.Sidecar]) -> None:
    src, dst = pair
    with src.client(timeout=60) as s, dst.client(timeout=60) as d:
        move_kit.fill_group(s, GROUP, requests=1)
        for target, piece in (("", 0), ("unix:///tmp/x.sock", 0), ("host:port", 0), (dst.address, 7)):
            with pytest.raises(grpc.RpcError) as bad:
                s.move_group(group=GROUP, target=target, piece_bytes=piece)
            assert code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT, target
        with pytest.raises(grpc.RpcError) as unknown:
            s.move_group(group="ns/nope", target=dst.address)
        assert code_of(unknown) == grpc.StatusCode.NOT_FOUND
        s.mark_lost(group=GROUP, ranks=[0], reason="xid 79")
        with pytest.raises(grpc.RpcError) as lost:
            s.move_group(group=GROUP, target=dst.address)
        assert code_of(lost) == grpc.StatusCode.FAILED_PRECONDITION
        s.rebuild(group=GROUP, lost_ranks=[0])
        assert s.move_group(group=GROUP, target=dst.address).ranks_moved == 2
        assert d.list_groups().groups == [GROUP]


def test_two_moves_of_one_group_at_once_install_it_once(pair: tuple[kv.Sidecar, kv.Sidecar]) -> None:
    """Two operator replicas (or a retry racing the first call) move the same group together."""
    import concurrent.futures

    src, dst = pair
    with src.client(timeout=120) as s, dst.client(timeout=60) as d:
        filled = move_kit.fill_group(s, GROUP, requests=2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            calls = [
                pool.submit(s.move_group, group=GROUP, target=dst.address, piece_bytes=64 * 1024)
                for _ in range(2)
            ]
            replies = [c.result(timeout=120) for c in calls]
        total = sum(p.size for p in filled.pools)
        # Whatever the interleaving, every pool byte went over (one stream waits for the other and
        # then finds the group installed, or resumes where it stopped) and the group is installed once.
        assert sum(r.bytes_moved for r in replies) >= total
        assert all(r.ranks_moved == 2 for r in replies)
        got = move_kit.read_pools(d, GROUP)
        assert all(np.array_equal(a, b) for a, b in zip(got, filled.pools, strict=True))
        stats = d.get_stats()
        assert stats.moves_in_progress == 0 and d.list_groups().groups == [GROUP]
