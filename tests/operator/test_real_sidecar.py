"""The operator against REAL `ghostserve sidecar` processes, one per node (each on its node's own
loopback IP, the same port everywhere, fake NVML): a GPU fault reported by a sidecar's health stream
makes the operator mark exactly that rank lost, rebuild it from the survivor and parity, and either
recreate the replica on the same node (GPU swap) or move the whole group, KV and ledger, to another
node's sidecar first. The test plays the engine: attach with the GPU UUIDs, write KV, commit, flush;
after the recovery it attaches where the replica now runs and compares every byte."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from ghostserve.sidecar import pools
from ghostserve.v1 import sidecar_pb2 as pb

from tests.operator import harness
from tests.operator.test_operator_kopf import NAME, NS, deployment, gsd, pod, recovered, serving

GROUP = f"{NS}/{NAME}-r0"
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


def fake_uuid(harness_gpu: str) -> str:
    """The sidecar's fake NVML UUID of the GPU the stand-in device plugin handed out (same index)."""
    return f"GPU-fake-{int(harness_gpu.rsplit('-', 1)[1]):04d}"


@pytest.fixture
def sidecars(
    cluster_two: harness.Cluster, tmp_path: pathlib.Path
) -> Iterator[dict[str, harness.RealSidecar]]:
    started = {}
    try:
        for i, node in enumerate(cluster_two.node_names):
            started[node] = harness.RealSidecar(
                tmp_path, node=node, gpus=3, ip=harness.node_ip(i), port=cluster_two.sidecar_port
            )
        for side in started.values():
            side.wait_ready()
        yield started
    finally:
        leaked = [seg for side in started.values() for seg in side.stop()]
        assert not leaked, f"sidecars left shared memory behind: {leaked}"


@pytest.fixture
def cluster_two(request: pytest.FixtureRequest) -> Iterator[harness.Cluster]:
    """Two nodes of `request.param` GPUs whose sidecars are real processes (started by `sidecars`)."""
    with harness.Cluster() as c:
        for i in range(2):
            c.add_node(f"n{i}", gpus=int(request.param), sidecar=False)
        yield c


def attach(side: harness.RealSidecar, rank: int, uuid: str) -> pb.AttachResponse:
    with side.client() as c:
        return c.attach(
            group=GROUP,
            rank=rank,
            world_size=2,
            layout=LAYOUT,
            worker_id=f"test-r{rank}",
            device_uuid=uuid,
            protection=pb.Protection(code=pb.XOR, parity_shards=1, chunk_tokens=CHUNK),
        )


def play_engine(side: harness.RealSidecar, uuids: list[str]) -> dict[int, np.ndarray]:
    """Both ranks attach with their GPUs, write KV into their pools and commit two chunks."""
    written = {rank: write_pool(attach(side, rank, uuids[rank]).pool, seed=rank) for rank in (0, 1)}
    with side.client() as c:
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
    return written


def _serving_replica(cluster: harness.Cluster) -> tuple[dict[str, Any], str]:
    """Create a TP=2 deployment, wait until it serves; (replica 0's pod, the node it runs on)."""
    cluster.write("create", harness.GSD, NS, None, deployment(tp=2))
    cluster.wait_for(lambda: serving(cluster), timeout=60, what="Serving 2/2")
    before = pod(cluster, 0)
    assert before is not None
    return before, before["spec"]["nodeName"]


@pytest.mark.parametrize("cluster_two", [3, 2], indirect=True, ids=["same-node-swap", "move"])
def test_gpu_fault_swaps_the_gpu_or_moves_the_replica_with_its_kv(
    cluster_two: harness.Cluster, sidecars: dict[str, harness.RealSidecar], tmp_path: pathlib.Path
) -> None:
    cluster = cluster_two
    swap = cluster.get(harness.NODES, None, "n0")["status"]["capacity"]["nvidia.com/gpu"] == "3"  # type: ignore[index]
    operator = harness.OperatorProcess(
        cluster.kubeconfig(tmp_path / "kubeconfig"),
        tmp_path / "operator.log",
        sidecar_port=cluster.sidecar_port,
    )
    try:
        before, source = _serving_replica(cluster)
        target = source if swap else next(n for n in cluster.node_names if n != source)
        uuids = [fake_uuid(g) for g in harness.gpus_of(before)]
        written = play_engine(sidecars[source], uuids)
        cluster.wait_for(
            lambda: gsd(cluster)["status"]["protection"]["protected"] == "yes", timeout=60, what="Protected"
        )

        # Rank 1's GPU fails. 3-GPU nodes keep 2 healthy ones: same-node swap. 2-GPU nodes keep 1, TP=2
        # needs 2: the replica moves.
        cluster.call(lambda: _mark_unhealthy(cluster, source, harness.gpus_of(before)[1]))
        with sidecars[source].client() as c:
            c.inject_fault(
                gpu_index=int(harness.gpus_of(before)[1].rsplit("-", 1)[1]),
                kind=pb.XID,
                xid=79,
                message="GPU has fallen off the bus",
            )
        cluster.wait_for(lambda: recovered(cluster, 1), timeout=90, what="device recovery with a move")
        last = gsd(cluster)["status"]["lastRecovery"]
        assert (last["kind"], last["reason"], last["ranks"], last["outcome"], last["kv"]) == (
            "device",
            "Xid",
            [1],
            "Succeeded",
            "Rebuilt" if swap else "Moved",
        )
        assert (last["sourceNode"], last["targetNode"]) == (source, target)
        assert last["chunksRebuilt"] == 2 and last["bytesRebuilt"] == 2 * 2 * LAYOUT.layers * CHUNK * ROW
        assert (last.get("bytesMoved", 0) > 0) is not swap
        after = pod(cluster, 0)
        assert after is not None and after["spec"]["nodeName"] == target
        assert harness.gpus_of(before)[1] not in harness.gpus_of(after)

        # The new engine attaches to its node's sidecar: both ranks' KV is there, bit for bit (rank 1
        # rebuilt from rank 0 + parity on the old node, then streamed when it moved); no old copy left.
        new_uuids = [fake_uuid(g) for g in harness.gpus_of(after)]
        for rank in (0, 1):
            found = read_pool(attach(sidecars[target], rank, new_uuids[rank]).pool)
            for slots in SLOTS.values():
                assert shard(found, slots) == shard(written[rank], slots), f"rank {rank}"
        if not swap:
            with sidecars[source].client() as c:
                assert GROUP not in list(c.list_groups().groups)

        cluster.write("delete", harness.GSD, NS, NAME)
        cluster.wait_for(lambda: cluster.get(harness.GSD, NS, NAME) is None, timeout=60, what="deletion")
        with sidecars[target].client() as c:
            assert GROUP not in list(c.list_groups().groups)
    finally:
        operator.stop()
        print(operator.output()[-6000:])


async def _mark_unhealthy(cluster: harness.Cluster, node: str, gpu: str) -> None:
    """The device plugin's part of a GPU fault: the GPU is unhealthy, allocatable drops."""
    cluster.nodes.unhealthy.setdefault(node, set()).add(gpu)
    raw = cluster.emulator.objects[(harness.NODES, None, node)].raw
    left = int(raw["status"]["capacity"]["nvidia.com/gpu"]) - len(cluster.nodes.unhealthy[node])
    await cluster.emulator.write(
        "update", harness.NODES, None, node, {"status": {"allocatable": {"nvidia.com/gpu": str(left)}}}
    )


@pytest.mark.parametrize("cluster_two", [3], indirect=True, ids=["same-node-swap"])
def test_a_rebuild_done_before_the_operators_own_is_reported_with_the_sidecars_bytes(
    cluster_two: harness.Cluster, sidecars: dict[str, harness.RealSidecar], tmp_path: pathlib.Path
) -> None:
    # The operator is SIGKILLed right after MarkLost. Meanwhile the engine's lost rank re-attaches, is
    # told to rebuild and rebuilds itself (as the reference engine does at attach), and the request then
    # finishes and leaves the ledger. The next operator's own Rebuild finds nothing to do (0 bytes):
    # the rebuild did happen, so the outcome is Succeeded/Rebuilt with the sidecar's bytes, not Degraded.
    cluster = cluster_two
    first = harness.OperatorProcess(
        cluster.kubeconfig(tmp_path / "kubeconfig-a"),
        tmp_path / "operator-a.log",
        sidecar_port=cluster.sidecar_port,
        crash_at="after:markLost",
    )
    second = None
    try:
        before, source = _serving_replica(cluster)
        gpus = harness.gpus_of(before)
        uuids = [fake_uuid(g) for g in gpus]
        written = play_engine(sidecars[source], uuids)
        cluster.wait_for(
            lambda: gsd(cluster)["status"]["protection"]["protected"] == "yes", timeout=60, what="Protected"
        )
        cluster.call(lambda: _mark_unhealthy(cluster, source, gpus[1]))
        with sidecars[source].client() as c:
            c.inject_fault(
                gpu_index=int(gpus[1].rsplit("-", 1)[1]), kind=pb.XID, xid=79, message="fell off the bus"
            )
        assert first.proc.wait(timeout=90) == -9  # SIGKILLed itself once MarkLost returned

        spare = next(u for u in (fake_uuid(f"gpu-{i}") for i in range(3)) if u not in uuids)
        reattached = attach(sidecars[source], 1, spare)
        assert reattached.needs_rebuild
        with sidecars[source].client() as c:
            report = c.rebuild(group=GROUP, lost_ranks=[1])
            engine_bytes = int(report.bytes_rebuilt)
            c.release_request(group=GROUP, request_id="req-1")
        assert engine_bytes == 2 * 2 * LAYOUT.layers * CHUNK * ROW  # 2 chunks of one rank
        rebuilt = read_pool(reattached.pool)
        for slots in SLOTS.values():
            assert shard(rebuilt, slots) == shard(written[1], slots)

        second = harness.OperatorProcess(
            cluster.kubeconfig(tmp_path / "kubeconfig-b"),
            tmp_path / "operator-b.log",
            sidecar_port=cluster.sidecar_port,
        )
        cluster.wait_for(lambda: recovered(cluster, 1), timeout=90, what="the recovery finished")
        last = gsd(cluster)["status"]["lastRecovery"]
        assert (last["kind"], last["ranks"], last["kv"]) == ("device", [1], "Rebuilt")
        assert last["outcome"] == "Succeeded", last
        assert last["chunksRebuilt"] == 2 and last["bytesRebuilt"] == engine_bytes
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
                print(proc.output()[-6000:])
