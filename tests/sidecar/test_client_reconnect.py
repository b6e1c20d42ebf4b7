"""A client made after the sidecar restarted reaches it at once, even while an older client of the same
address is still open.

Engines keep the client they were given and, after UNAVAILABLE, swap in a fresh one
(`adapter.SidecarSession._fresh_channel`), expecting it to dial at once. With gRPC's global subchannel
pool every channel to one address with the same arguments shares one connection and its reconnect
backoff, so the fresh client failed fast (UNAVAILABLE) until the old one's backoff ran out: in the
embedded cluster the prefill commits of the requests served just after a sidecar restart were all lost
that way, the sidecar held no protected chunk of them when a GPU failed next, and nothing could be
rebuilt (the operator-kill scenario of tests/cluster/test_scenarios.py, docs/cluster.md "Known gaps").

A long reconnect backoff makes the shared backoff deterministic here: a real sidecar process is killed
and restarted; the readiness probe of the restart uses other channel arguments (its own connection);
the clients under test never share one with anything but each other.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from ghostserve.engine import adapter, sidecar_process
from ghostserve.kernels import layout as layout_mod
from ghostserve.sidecar import client as client_mod

LAYOUT = layout_mod.KVLayout(layers=2, kv_heads=1, head_dim=8, dtype="float32", page_size=4, pool_slots=64)
PROT = adapter.Protection("xor", chunk_tokens=4)
BACKOFF_MS = 120_000  # far longer than the test: a shared backoff would fail every call after the restart
LONG_BACKOFF = [
    ("grpc.initial_reconnect_backoff_ms", BACKOFF_MS),
    ("grpc.min_reconnect_backoff_ms", BACKOFF_MS),
    ("grpc.max_reconnect_backoff_ms", BACKOFF_MS),
]


@pytest.fixture
def sidecar(tmp_path: pathlib.Path, shm_prefix: str) -> Iterator[sidecar_process.SidecarProcess]:
    sc = sidecar_process.SidecarProcess(tmp_path / "sc", extra_args=("--shm-prefix", shm_prefix))
    sc.start()
    yield sc
    sc.stop()


def _restart(
    sc: sidecar_process.SidecarProcess, monkeypatch: pytest.MonkeyPatch, options: list[tuple[str, Any]]
) -> None:
    """Start the killed sidecar again; its readiness probe (a client in this process) gets the module's
    own options, so it dials on a connection of its own, not on the one under test."""
    monkeypatch.setattr(client_mod, "CHANNEL_OPTIONS", options)
    sc.start()
    monkeypatch.setattr(client_mod, "CHANNEL_OPTIONS", [*options, *LONG_BACKOFF])


def test_a_fresh_client_reaches_a_restarted_sidecar_while_an_old_one_is_open(
    sidecar: sidecar_process.SidecarProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = list(client_mod.CHANNEL_OPTIONS)
    monkeypatch.setattr(client_mod, "CHANNEL_OPTIONS", [*options, *LONG_BACKOFF])
    old = client_mod.SidecarClient(sidecar.address, timeout=5.0)
    try:
        assert old.health() == 1  # SERVING
        sidecar.kill()
        with pytest.raises(grpc.RpcError) as down:
            old.health()  # its reconnect fails: the old client now waits out its (long) backoff
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        _restart(sidecar, monkeypatch, options)
        with client_mod.SidecarClient(sidecar.address, timeout=5.0) as fresh:
            assert fresh.health() == 1
    finally:
        old.close()


def test_a_ranks_commits_reach_a_restarted_sidecar_at_once(
    sidecar: sidecar_process.SidecarProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rank's pattern (engine/ghostserve/engine/reference/rank.py): the session gets a client it does not
    # own and a `reconnect` factory; commits that meet a sidecar down are lost (unprotected, counted),
    # the first commit after the sidecar is back must be accepted (re-attach included).
    options = list(client_mod.CHANNEL_OPTIONS)
    monkeypatch.setattr(client_mod, "CHANNEL_OPTIONS", [*options, *LONG_BACKOFF])
    first = client_mod.SidecarClient(sidecar.address, timeout=5.0)
    session = adapter.SidecarSession(
        first,
        "rc/g",
        rank=0,
        world_size=1,
        layout=LAYOUT,
        protection=PROT,
        worker_id="w0",
        reconnect=lambda: client_mod.SidecarClient(sidecar.address, timeout=5.0),
    )
    try:
        session.attach()
        assert session.commit("r", 0, [0, 1, 2, 3], [1, 2, 3, 4])
        sidecar.kill()
        assert not session.commit("r", 1, [4, 5, 6, 7], [1, 2, 3, 4])  # the sidecar is down: unprotected
        assert session.commits_failed == 1
        _restart(sidecar, monkeypatch, options)
        assert session.commit("r", 2, [8, 9, 10, 11], [1, 2, 3, 4]), "commit after the restart was lost"
        assert (session.commits_failed, session.reattaches) == (1, 1)
        with client_mod.SidecarClient(sidecar.address) as probe:
            ledger = probe.describe_request(group="rc/g", request_id="r")
        # Chunk 0 came back from the sidecar's journal, chunk 1 was lost with the sidecar, chunk 2 arrived.
        assert sorted(c.chunk_index for c in ledger.chunks) == [0, 2]
    finally:
        first.close()
        if session.client is not first:
            session.client.close()
