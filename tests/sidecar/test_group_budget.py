"""A group's own parity budget (AttachRequest.parity_budget_bytes, from spec.protection.hostMemoryBudget)
bounds that group's parity inside the sidecar's global budget; other groups keep protecting."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import inproc
import kv
import pytest
from ghostserve.sidecar import client, config
from ghostserve.v1 import sidecar_pb2 as pb

SHARD = 4096  # xor over 2 ranks: one 4 KiB parity shard per 16-token chunk


@pytest.fixture
def sc(short_tmp: pathlib.Path, shm_prefix: str) -> Iterator[client.SidecarClient]:
    cfg = config.Config(budget_bytes=1 << 20, shm_prefix=shm_prefix)
    with inproc.served(short_tmp, cfg) as c:
        yield c


def attach_both(c: client.SidecarClient, group: str, budget: int) -> None:
    for rank in range(2):
        c.attach(group=group, rank=rank, world_size=2, layout=kv.LAYOUT, protection=kv.protection("xor", 1),
                 worker_id=f"{group}-{rank}", parity_budget_bytes=budget)


def commit(c: client.SidecarClient, group: str, rid: str, idx: int) -> None:
    slots = list(range(idx * kv.CHUNK, (idx + 1) * kv.CHUNK))
    for rank in range(2):
        try:
            c.commit_chunk(group=group, rank=rank, request_id=rid, chunk_index=idx, slots=slots)
        except Exception as exc:  # RESOURCE_EXHAUSTED = accepted, unprotected (docs/sidecar.md)
            assert "RESOURCE_EXHAUSTED" in str(exc), exc


def test_group_budget_bounds_the_group_and_spares_the_others(sc: client.SidecarClient) -> None:
    attach_both(sc, "ns/small-r0", 2 * SHARD)
    attach_both(sc, "ns/free-r0", 0)
    assert sc.describe_group(group="ns/small-r0").parity_budget_bytes == 2 * SHARD
    for idx in range(4):
        commit(sc, "ns/small-r0", "a", idx)
        commit(sc, "ns/free-r0", "a", idx)
    assert sc.flush("", wait=30).drained
    small = sc.describe_group(group="ns/small-r0")
    free = sc.describe_group(group="ns/free-r0")
    # A request never evicts its own parity for its next chunk: chunks 2 and 3 stay unprotected.
    assert small.parity_bytes == 2 * SHARD and small.requests[0].chunks_protected == 2
    assert free.parity_bytes == 4 * SHARD and free.requests[0].chunks_protected == 4
    led = sc.describe_request(group="ns/small-r0", request_id="a")
    assert [ch.state for ch in led.chunks] == [pb.PROTECTED] * 2 + [pb.UNPROTECTED] * 2

    # Another request of the group over its budget evicts the group's own least valuable parity,
    # never another group's.
    commit(sc, "ns/small-r0", "b", 5)
    assert sc.flush("", wait=30).drained
    small = sc.describe_group(group="ns/small-r0")
    assert {r.request_id: r.chunks_protected for r in small.requests} == {"a": 0, "b": 1}
    assert small.parity_bytes == SHARD
    assert sc.describe_group(group="ns/free-r0").parity_bytes == 4 * SHARD

    # A later attach with a bigger budget raises it: new chunks are protected again.
    attach_both(sc, "ns/small-r0", 4 * SHARD)
    commit(sc, "ns/small-r0", "b", 6)
    commit(sc, "ns/small-r0", "b", 7)
    assert sc.flush("", wait=30).drained
    assert sc.describe_group(group="ns/small-r0").parity_bytes == 3 * SHARD
