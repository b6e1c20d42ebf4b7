"""The operator against a REAL `ghostserve sidecar` process: a GPU fault reported by the sidecar's
health stream makes the operator reschedule only that rank and have the sidecar rebuild its KV,
byte for byte, from the survivor and parity; deleting the deployment frees the group."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
from ghostserve.sidecar import pools
from ghostserve.v1 import sidecar_pb2 as pb

from tests.operator import harness
from tests.operator.test_operator_kopf import NAME, NS, deployment, gsd, pod, serving

GROUP = f"{NS}/{NAME}-g0"
# 2 layers x 2 heads x 16 dims of fp16 = 64-byte rows; a 16-token chunk is a 4 KiB shard per rank.
LAYOUT = pb.KVLayout(layers=2, kv_heads=2, head_dim=16, dtype=pb.FLOAT16, page_size=16, pool_slots=64)
CHUNK, ROW = 16, 64
SLOTS = {0: list(range(0, 16)), 1: list(range(32, 48))}  # chunk index -> pool slots (same on every rank)


def shard(pool: np.ndarray, slots: list[int]) -> bytes:
    return pool.reshape(2 * LAYOUT.layers, LAYOUT.pool_slots, ROW)[:, slots, :].tobytes()


def write_pool(handle: pb.PoolHandle, *, seed: int) -> np.ndarray:
    """Fill a rank's pool with random bytes (every float bit pattern); returns a copy of them."""
    mm, view = pools.map_pool(handle)
    try:
        view[:] = np.random.default_rng(seed).integers(0, 256, view.size, dtype=np.uint8)
        return view.copy()
    finally:
        del view
        mm.close()


def read_pool(handle: pb.PoolHandle) -> np.ndarray:
    mm, view = pools.map_pool(handle)
    try:
        return view.copy()
    finally:
        del view
        mm.close()


@pytest.fixture
def real_sidecar(tmp_path: pathlib.Path) -> Iterator[harness.RealSidecar]:
    side = harness.RealSidecar(tmp_path, node="n1")
    try:
        side.wait_ready()
        yield side
    finally:
        leaked = side.stop()
        assert not leaked, f"sidecar left shared memory behind: {leaked}"


def attach(side: harness.RealSidecar, rank: int) -> pb.AttachResponse:
    with side.client() as c:
        return c.attach(
            group=GROUP,
            rank=rank,
            world_size=2,
            layout=LAYOUT,
            worker_id=f"test-r{rank}",
            protection=pb.Protection(code=pb.XOR, parity_shards=1, chunk_tokens=CHUNK),
        )


def test_sidecar_health_fault_rebuilds_the_lost_rank(
    cluster: harness.Cluster, real_sidecar: harness.RealSidecar, tmp_path: pathlib.Path
) -> None:
    operator = harness.OperatorProcess(cluster.kubeconfig(tmp_path / "kubeconfig"), tmp_path / "operator.log")
    try:
        cluster.write("create", harness.GSD, NS, None, deployment(real_sidecar.port))
        cluster.wait_for(lambda: serving(cluster), timeout=60, what="Serving 2/2")
        r0, r1 = pod(cluster, 0, 0), pod(cluster, 0, 1)
        assert (
            r0 is not None and r1 is not None and r1["spec"]["nodeName"] == "n1"
        )  # the node the sidecar runs as

        # Play the engine: both ranks attach, write KV into their pools and commit two chunks.
        written = {rank: write_pool(attach(real_sidecar, rank).pool, seed=rank) for rank in (0, 1)}
        with real_sidecar.client() as c:
            for chunk, slots in SLOTS.items():
                for rank in (0, 1):
                    c.commit_chunk(
                        group=GROUP,
                        rank=rank,
                        request_id="req-1",
                        chunk_index=chunk,
                        slots=slots,
                        token_ids=list(range(chunk * CHUNK, (chunk + 1) * CHUNK)),
                    )
            assert c.flush(GROUP, wait=30).drained

        # The GPU under rank 1 fails: the sidecar's fake NVML raises Xid 79 on its health stream.
        with real_sidecar.client() as c:
            c.inject_fault(
                gpu_index=int(r1["metadata"]["annotations"]["ghostserve.io/gpu"]),
                kind=pb.XID,
                xid=79,
                message="GPU has fallen off the bus",
            )
        cluster.wait_for(
            lambda: gsd(cluster)["status"].get("recoveries") == 1 and serving(cluster),
            timeout=60,
            what="device recovery",
        )
        last = gsd(cluster)["status"]["lastRecovery"]
        assert (last["kind"], last["reason"], last["rank"], last["outcome"]) == (
            "device",
            "Xid",
            1,
            "Succeeded",
        )
        assert last["chunksRebuilt"] == 2 and last["chunksRecomputed"] == 0
        assert last["bytesRebuilt"] == 2 * 2 * LAYOUT.layers * CHUNK * ROW
        replacement = pod(cluster, 0, 1)
        assert replacement is not None and replacement["metadata"]["uid"] != r1["metadata"]["uid"]
        assert pod(cluster, 0, 0)["metadata"]["uid"] == r0["metadata"]["uid"]  # type: ignore[index]

        # The replacement worker attaches and finds rank 1's KV rebuilt, bit for bit.
        rebuilt = read_pool(attach(real_sidecar, 1).pool)
        for slots in SLOTS.values():
            assert shard(rebuilt, slots) == shard(written[1], slots)
        assert shard(rebuilt, SLOTS[0]) != shard(written[0], SLOTS[0])  # not simply the survivor's bytes

        cluster.write("delete", harness.GSD, NS, NAME)
        cluster.wait_for(lambda: cluster.get(harness.GSD, NS, NAME) is None, timeout=60, what="deletion")
        with real_sidecar.client() as c:
            assert GROUP not in list(c.list_groups().groups)
    finally:
        operator.stop()
