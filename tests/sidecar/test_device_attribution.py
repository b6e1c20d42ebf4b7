"""Device attribution: ranks attach with their GPU's UUID, DescribeGroup reports it, and a health event
for a GPU names the group and rank running on it (no group when no rank holds that GPU). The GPUs are
the sidecar's fake NVML backend (no GPU here)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import grpc
import inproc
import kv
import pytest
from ghostserve.sidecar import client, config
from ghostserve.v1 import sidecar_pb2 as pb


@pytest.fixture
def sc(short_tmp: pathlib.Path, shm_prefix: str) -> Iterator[client.SidecarClient]:
    cfg = config.Config(fake_gpus=4, shm_prefix=shm_prefix, state_dir=short_tmp / "state")
    with inproc.served(short_tmp, cfg) as c:
        yield c


def uuid(i: int) -> str:
    return f"GPU-fake-{i:04d}"  # what the fake backend reports for GPU i


def attach(c: client.SidecarClient, group: str, rank: int, gpu: str) -> None:
    c.attach(
        group=group,
        rank=rank,
        world_size=2,
        layout=kv.LAYOUT,
        protection=kv.protection("xor", 1),
        worker_id=f"{group}-{rank}",
        device_uuid=gpu,
    )


def test_health_events_name_the_rank_on_the_gpu(sc: client.SidecarClient) -> None:
    attach(sc, "ns/a-r0", 0, uuid(0))
    attach(sc, "ns/a-r0", 1, uuid(1))
    attach(sc, "ns/b-r0", 0, uuid(2))
    desc = sc.describe_group(group="ns/a-r0")
    assert [r.device_uuid for r in desc.ranks] == [uuid(0), uuid(1)]
    assert [r.device_uuid for r in sc.describe_group(group="ns/b-r0").ranks] == [uuid(2), ""]

    stream = sc.watch_health(initial_state=True, timeout=30)
    initial = [next(stream) for _ in range(4)]
    assert [(e.gpu_uuid, e.group, e.rank) for e in initial] == [
        (uuid(0), "ns/a-r0", 0),
        (uuid(1), "ns/a-r0", 1),
        (uuid(2), "ns/b-r0", 0),
        (uuid(3), "", 0),
    ]
    sc.inject_fault(gpu_index=1, kind=pb.XID, xid=79, message="fell off the bus")
    sc.inject_fault(gpu_index=3, kind=pb.XID, xid=79, message="a GPU no rank holds")
    got = [next(stream), next(stream)]
    assert [(e.gpu_uuid, e.fatal, e.group, e.rank) for e in got] == [
        (uuid(1), True, "ns/a-r0", 1),
        (uuid(3), True, "", 0),
    ]
    stream.cancel()  # type: ignore[attr-defined]


def test_the_rank_attached_now_wins_over_one_left_behind(sc: client.SidecarClient) -> None:
    """A replica moved away left its group here (its worker died without detaching); the GPU now
    runs a rank of another replica: the event is that rank's, never both, never the old one."""
    attach(sc, "ns/old-r0", 1, uuid(2))
    sc.detach(group="ns/old-r0", rank=1)
    attach(sc, "ns/new-r1", 0, uuid(2))
    attach(sc, "ns/stale-r2", 0, uuid(3))  # attached earlier and never detached
    attach(sc, "ns/fresh-r3", 1, uuid(3))  # attached later on the same GPU
    stream = sc.watch_health(initial_state=False, timeout=30)
    sc.inject_fault(gpu_index=2, kind=pb.ECC_DOUBLE_BIT)
    sc.inject_fault(gpu_index=3, kind=pb.GPU_LOST)
    got = [next(stream), next(stream)]
    assert [(e.group, e.rank) for e in got] == [("ns/new-r1", 0), ("ns/fresh-r3", 1)]
    stream.cancel()  # type: ignore[attr-defined]


def test_a_bad_uuid_is_refused_and_changes_nothing(sc: client.SidecarClient) -> None:
    for bad in ("GPU 0", "x" * 129, "GPU-\n", "../../etc"):
        with pytest.raises(grpc.RpcError) as err:
            attach(sc, "ns/a-r0", 0, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert sc.list_groups().groups == []
    # A CPU-only rank gives no UUID; a re-attach on another GPU replaces the old one.
    attach(sc, "ns/a-r0", 0, "")
    assert sc.describe_group(group="ns/a-r0").ranks[0].device_uuid == ""
    attach(sc, "ns/a-r0", 0, uuid(1))
    assert sc.describe_group(group="ns/a-r0").ranks[0].device_uuid == uuid(1)
