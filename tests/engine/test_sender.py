"""The background sender both engines use, against a real sidecar process: commits queued back to back go
in one CommitChunks call, in order with records and releases; a rejected chunk costs only its request;
a sidecar without CommitChunks gets one CommitChunk per chunk."""

from __future__ import annotations

import pathlib
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import pytest
from ghostserve.engine import adapter, sender
from ghostserve.sidecar import client as client_mod
from ghostserve.sidecar import config, service
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.v1 import sidecar_pb2_grpc as pb_grpc
from test_adapter import LAYOUT, _sessions

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "sidecar"))
import inproc


class GatedSession(adapter.SidecarSession):
    """A real session whose first CommitChunks call waits for `gate`: the test queues more meanwhile."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def commit_many(
        self, commits: Sequence[adapter.ChunkCommit]
    ) -> list[adapter.Sent | adapter.AdapterError]:
        self.entered.set()
        self.gate.wait(30)
        self.calls.append(len(commits))
        return super().commit_many(commits)


def _gated(client: client_mod.SidecarClient, group: str) -> tuple[GatedSession, adapter.SidecarSession]:
    plain = _sessions(client, group)
    first = GatedSession(
        client, group, rank=0, world_size=2, layout=LAYOUT, protection=plain[0].protection, worker_id="w0"
    )
    first.attach()
    plain[1].attach()
    return first, plain[1]


def _slots(i: int) -> list[int]:
    return [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]


def test_commits_queued_behind_a_call_go_in_one_batch_in_order(sidecar, no_shm_leak):
    with client_mod.SidecarClient(sidecar.address) as client:
        s0, s1 = _gated(client, "se/a")
        rejected: list[str] = []
        snd = sender.CommitSender(s0, on_rejected=lambda rid, exc: rejected.append(rid))
        snd.submit("a", 0, _slots(0), [1, 2, 3, 4])
        assert s0.entered.wait(30)  # the sender is inside its first call: the rest queue up
        for i in range(1, 11):
            snd.submit("a", i, _slots(i), [i] * 4)
        snd.release("a")
        snd.submit("b", 0, _slots(11), [9] * 4)
        s0.gate.set()
        snd.drain()
        assert s0.calls == [1, 10, 1]  # the release split the commits: order kept
        assert snd.batches == 3 and s0.commits_sent == 12 and rejected == []
        with pytest.raises(grpc.RpcError) as err:
            client.describe_request(group="se/a", request_id="a")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the release went after its commits
        del s1
        entry = client.describe_request(group="se/a", request_id="b")
        assert [c.chunk_index for c in entry.chunks] == [0]
        client.delete_group(group="se/a")


def test_a_rejected_chunk_costs_only_its_request(sidecar, no_shm_leak):
    with client_mod.SidecarClient(sidecar.address) as client:
        s0, s1 = _gated(client, "se/b")
        assert s1.commit("bad", 0, _slots(0), [1] * 4)  # rank 1 wrote "bad" chunk 0 at slots 0-3
        rejected: list[tuple[str, str]] = []
        snd = sender.CommitSender(s0, on_rejected=lambda rid, exc: rejected.append((rid, str(exc))))
        snd.submit("good", 0, _slots(5), [5] * 4)
        assert s0.entered.wait(30)
        snd.submit("good", 1, _slots(6), [6] * 4)
        snd.submit("bad", 0, _slots(7), [1] * 4)  # other slots than rank 1's: a bookkeeping bug
        snd.submit("bad", 1, _slots(8), [2] * 4)
        snd.submit("good", 2, _slots(9), [7] * 4)
        s0.gate.set()
        snd.drain()
        assert s0.calls == [1, 4]
        assert [rid for rid, _ in rejected] == ["bad"] and "chunk 0 of 'bad'" in rejected[0][1]
        good = client.describe_request(group="se/b", request_id="good")
        assert [c.chunk_index for c in good.chunks] == [0, 1, 2]
        bad = client.describe_request(group="se/b", request_id="bad")
        assert [(c.chunk_index, list(c.slots)) for c in bad.chunks] == [(0, _slots(0)), (1, _slots(8))]
        client.delete_group(group="se/b")


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll real state (a sender's parked count, the sidecar's ledger) until `predicate` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_commits_and_releases_that_met_a_restarting_sidecar_are_sent_again(sidecar, no_shm_leak):
    """Before: a commit or release sent while the sidecar restarted was lost: the chunk stayed
    unprotected and the finished request stayed in the ledger (docs/cluster.md, the operator-kill
    scenario's 0-byte rebuild)."""
    with client_mod.SidecarClient(sidecar.address, timeout=5.0) as client:
        sessions = _sessions(client, "se/d")
        for s in sessions:
            s.attach()
        fresh: list[client_mod.SidecarClient] = []

        def reconnect() -> client_mod.SidecarClient:
            fresh.append(client_mod.SidecarClient(sidecar.address, timeout=5.0))
            return fresh[-1]

        senders = []
        for s in sessions:
            s._reconnect = reconnect
            senders.append(sender.CommitSender(s))
            senders[-1].submit("fin", 0, _slots(7), [7] * 4)
            senders[-1].submit("kept", 0, _slots(8), [8] * 4)
            senders[-1].drain()
        assert client.flush("se/d", wait=30).drained
        sidecar.kill()
        for snd in senders:
            for i in range(3):
                snd.submit("q", i, _slots(i), [i] * 4)
            snd.submit("gone", 0, _slots(5), [5] * 4)
            snd.release("gone")  # finished while the sidecar was down: its parked commit is dropped
            snd.release("fin")  # finished while the sidecar was down: its release waits
            snd.drain()  # drain never waits for an unreachable sidecar
        assert [snd.parked() for snd in senders] == [5, 5]  # q's 3 commits, 2 releases
        sidecar.start()
        _wait(lambda: all(snd.parked() == 0 for snd in senders), "the parked calls to be sent")
        assert [snd.resent for snd in senders] == [5, 5] and [s.reattaches for s in sessions] == [1, 1]
        # The test's own client tried the dead sidecar too: a fresh one skips its reconnect backoff.
        client = fresh_client = client_mod.SidecarClient(sidecar.address)
        assert client.flush("se/d", wait=30).drained
        entry = client.describe_request(group="se/d", request_id="q")
        assert [(c.chunk_index, c.state) for c in entry.chunks] == [(i, pb.PROTECTED) for i in range(3)]
        # The ledger outlives a sidecar restart ("kept" is there): "fin" is gone because its release
        # got through after the restart.
        assert [c.chunk_index for c in client.describe_request(group="se/d", request_id="kept").chunks] == [0]
        for rid in ("gone", "fin"):
            with pytest.raises(grpc.RpcError) as err:
                client.describe_request(group="se/d", request_id=rid)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, rid
        client.delete_group(group="se/d")
        for c in [*fresh, fresh_client]:
            c.close()


def test_token_records_that_met_a_restarting_sidecar_are_sent_again(sidecar, no_shm_leak):
    """Before: RecordTokens sent while the sidecar restarted was dropped, and the request lost its prompt
    length and budget for resume. The newest record of a request is the one sent."""
    with client_mod.SidecarClient(sidecar.address, timeout=5.0) as client:
        (s0, _s1) = _sessions(client, "se/r")
        s0.attach()
        fresh: list[client_mod.SidecarClient] = []

        def reconnect() -> client_mod.SidecarClient:
            fresh.append(client_mod.SidecarClient(sidecar.address, timeout=5.0))
            return fresh[-1]

        s0._reconnect = reconnect
        snd = sender.CommitSender(s0)
        sidecar.kill()
        snd.record("r", [1, 2, 3], prompt_tokens=2, max_new_tokens=9)
        snd.record("r", [1, 2, 3, 4, 5], prompt_tokens=2, max_new_tokens=9)  # replaces the parked one
        snd.record("done", [7, 7], prompt_tokens=2)
        snd.release("done")  # finished while the sidecar was down: its record is not worth sending
        snd.drain()
        assert snd.parked() == 2  # r's newest record, done's release
        sidecar.start()
        _wait(lambda: snd.parked() == 0, "the parked record and release to be sent")
        with client_mod.SidecarClient(sidecar.address) as after:
            entry = after.describe_request(group="se/r", request_id="r")
            assert (list(entry.token_ids), entry.prompt_tokens) == ([1, 2, 3, 4, 5], 2)
            with pytest.raises(grpc.RpcError) as err:
                after.describe_request(group="se/r", request_id="done")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            after.delete_group(group="se/r")
        for c in fresh:
            c.close()


def test_parked_commits_are_bounded(sidecar, no_shm_leak, monkeypatch):
    monkeypatch.setattr(sender, "MAX_PARKED", 4)
    with client_mod.SidecarClient(sidecar.address, timeout=5.0) as client:
        (s0, _s1) = _sessions(client, "se/e")
        s0.attach()
        snd = sender.CommitSender(s0)
        sidecar.kill()
        for i in range(6):
            snd.submit("q", i, _slots(i), [i] * 4)
        snd.drain()
        assert (snd.parked(), snd.given_up) == (4, 2)
        sidecar.start()
        _wait(lambda: snd.parked() == 0, "the parked commits to be sent")
        with client_mod.SidecarClient(sidecar.address) as after:
            entry = after.describe_request(group="se/e", request_id="q")
            assert [c.chunk_index for c in entry.chunks] == [2, 3, 4, 5]  # the oldest two were given up
            after.delete_group(group="se/e")


class ServicerBeforeCommitChunks(service.Servicer):
    """The real servicer with CommitChunks answered by the generated base class (UNIMPLEMENTED), as
    the release before it served."""

    CommitChunks = pb_grpc.SidecarServicer.CommitChunks


def test_a_sidecar_without_commit_chunks_gets_one_call_per_chunk(short_tmp, monkeypatch):
    """A rolling upgrade: an engine newer than its node's sidecar."""
    monkeypatch.setattr(service, "Servicer", ServicerBeforeCommitChunks)
    prefix = f"gs-t{secrets.token_hex(3)}-"
    bg = inproc.Background(inproc.unix_address(short_tmp), config.Config(fake_gpus=2, shm_prefix=prefix))
    try:
        with client_mod.SidecarClient(inproc.unix_address(short_tmp)) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.commit_chunks(group="se/c", rank=0, chunks=[])
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            s0, s1 = _sessions(client, "se/c")
            s0.attach()
            s1.attach()
            out = s0.commit_many([adapter.ChunkCommit("r", i, _slots(i), [i] * 4) for i in range(3)])
            assert out == [adapter.Sent.YES] * 3 and not s0._batches
            assert s0.commit("r", 3, _slots(3), [3] * 4)
            for i in range(4):
                assert s1.commit("r", i, _slots(i), [i] * 4)
            assert client.flush("se/c", wait=30).drained
            assert client.describe_group(group="se/c").requests[0].chunks_protected == 4
            client.delete_group(group="se/c")
    finally:
        bg.stop()
    assert not list(pathlib.Path("/dev/shm").glob(prefix + "*"))
