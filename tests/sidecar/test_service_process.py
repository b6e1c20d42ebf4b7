"""A real sidecar process on a Unix socket and on loopback TCP, with real worker processes."""

from __future__ import annotations

import json
import pathlib
import signal
import stat
import subprocess
import sys

import kv
import numpy as np
import pytest
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import pools, transfer

WORKER = pathlib.Path(__file__).with_name("worker.py")
KV_LAYOUT = kvlayout.KVLayout(2, 2, 16, "float16", 16, 256)


def make_plan(seed: int, requests: dict[str, int]) -> dict[str, list[tuple[int, list[int]]]]:
    """Disjoint, shuffled (non-contiguous) slots for each request's chunks."""
    perm = np.random.default_rng(seed).permutation(kv.LAYOUT.pool_slots).tolist()
    plan: dict[str, list[tuple[int, list[int]]]] = {}
    pos = 0
    for rid, chunks in requests.items():
        plan[rid] = []
        for c in range(chunks):
            plan[rid].append((c, perm[pos : pos + kv.CHUNK]))
            pos += kv.CHUNK
    return plan


def spawn(
    sc: kv.Sidecar, group: str, rank: int, world: int, code: str, m: int, mode: str, plan: object = None
):
    args = [sys.executable, str(WORKER), sc.address, group, str(rank), str(world), code, str(m), mode]
    if plan is not None:
        args.append(json.dumps(plan))
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=kv.REPO)


def read_rank(sc: kv.Sidecar, group: str, rank: int, world: int, code: str, m: int) -> dict[str, object]:
    p = spawn(sc, group, rank, world, code, m, "read")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    return json.loads(out)


@pytest.fixture(params=["unix", "tcp"])
def sidecar(request: pytest.FixtureRequest, short_tmp: pathlib.Path, shm_prefix: str):
    listen = f"127.0.0.1:{kv.free_port()}" if request.param == "tcp" else None
    sc = kv.start_sidecar(short_tmp, "--budget", "64MiB", listen=listen, prefix=shm_prefix)
    try:
        yield sc
    finally:
        sc.terminate()


def test_workers_commit_survive_sigkill_and_lost_ranks_are_rebuilt(sidecar: kv.Sidecar) -> None:
    n, code, m, group = 4, "rs", 2, "ns/demo-g0"
    plan = make_plan(1, {"req-a": 3, "req-b": 2, "req-c": 4})
    workers = [spawn(sidecar, group, r, n, code, m, "write", plan) for r in range(n)]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == b"committed"
        with sidecar.client() as c:
            assert c.flush(group, wait=30).drained
            desc = c.describe_group(group=group)
            assert {r.request_id: (r.chunks_committed, r.chunks_protected) for r in desc.requests} == {
                "req-a": (3, 3),
                "req-b": (2, 2),
                "req-c": (4, 4),
            }
            assert all(r.attached and r.pool_valid for r in desc.ranks)

            # A worker dies by SIGKILL; a new one re-attaches to the same pool and finds its KV intact.
            workers[1].send_signal(signal.SIGKILL)
            workers[1].wait(30)
            again = read_rank(sidecar, group, 1, n, code, m)
            expected = kv.pool_content(1, KV_LAYOUT.pool_nbytes)
            import hashlib

            assert again["sha"] == hashlib.sha256(expected).hexdigest()
            assert again["created"] is False and again["needs_rebuild"] is False

            # Two GPUs fail: their pools are wiped (new generation) and rebuilt from survivors + parity.
            c.mark_lost(group=group, ranks=[0, 2], reason="Xid 79")
            fresh = read_rank(sidecar, group, 2, n, code, m)
            assert fresh["needs_rebuild"] is True and fresh["generation"] == 1

            # Remote path first (nothing local changes): stream rank 0's shards into a local pool.
            remote = np.zeros(KV_LAYOUT.pool_nbytes, dtype=np.uint8)
            got = transfer.receive_into_pool(
                c.stream_rebuild(group=group, lost_ranks=[0, 2], rank=0), remote, KV_LAYOUT
            )
            assert got.failed == {} and {k: sorted(v) for k, v in got.written.items()} == {
                rid: [i for i, _ in chunks] for rid, chunks in plan.items()
            }
            want0 = kv.pool_content(0, KV_LAYOUT.pool_nbytes)
            for chunks in plan.values():
                for _, slots in chunks:
                    assert np.array_equal(kv.shard(remote, slots), kv.shard(want0, slots))

            report = c.rebuild(group=group, lost_ranks=[0, 2])
            assert {r.request_id: sorted(r.rebuilt_chunks) for r in report.requests} == {
                rid: [i for i, _ in chunks] for rid, chunks in plan.items()
            }
            assert all(not r.failed_chunks for r in report.requests)
            desc = c.describe_group(group=group)
            for rank in (0, 2):
                mm, pool = pools.map_pool(desc.ranks[rank].pool)
                want = kv.pool_content(rank, KV_LAYOUT.pool_nbytes)
                used = np.zeros(KV_LAYOUT.pool_slots, dtype=bool)
                for chunks in plan.values():
                    for _, slots in chunks:
                        assert np.array_equal(kv.shard(pool, slots), kv.shard(want, slots))
                        used[slots] = True
                # Slots no chunk covers were never written back: the fresh pool is still zero there.
                assert not kv.shard(pool, np.flatnonzero(~used).tolist()).any()
                del pool
                mm.close()
            assert all(r.pool_valid for r in desc.ranks)
            c.delete_group(group=group)
            assert c.list_groups().groups == []
    finally:
        for w in workers:
            if w.poll() is None:
                w.communicate(timeout=30)


@pytest.mark.parametrize(
    ("code", "m", "lost"),
    [("xor", 1, [3]), ("rdp", 2, [0, 3]), ("rs", 2, [1, 2]), ("replicate", 0, [0, 1, 2])],
)
def test_rebuild_is_bit_exact_for_every_code(
    short_tmp: pathlib.Path, shm_prefix: str, code: str, m: int, lost: list[int]
) -> None:
    sc = kv.start_sidecar(short_tmp, prefix=shm_prefix)
    n, group = 4, f"g-{code}"
    plan = make_plan(7, {"r1": 2, "r2": 3})
    try:
        with sc.client() as c:
            maps = []
            for r in range(n):
                reply = c.attach(
                    group=group, rank=r, world_size=n, layout=kv.LAYOUT, protection=kv.protection(code, m)
                )
                mm, pool = pools.map_pool(reply.pool)
                pool[:] = kv.pool_content(100 + r, pool.size)
                maps.append((mm, pool))
            for rid, chunks in plan.items():
                for idx, slots in chunks:
                    for r in range(n):
                        c.commit_chunk(group=group, rank=r, request_id=rid, chunk_index=idx, slots=slots)
            assert c.flush(group, wait=30).drained
            c.mark_lost(group=group, ranks=lost, reason="test")
            report = c.rebuild(group=group, lost_ranks=lost)
            assert sum(len(r.rebuilt_chunks) for r in report.requests) == 5
            desc = c.describe_group(group=group)
            for r in lost:
                mm, pool = pools.map_pool(desc.ranks[r].pool)
                want = kv.pool_content(100 + r, pool.size)
                for chunks in plan.values():
                    for _, slots in chunks:
                        assert np.array_equal(kv.shard(pool, slots), kv.shard(want, slots))
                del pool
                mm.close()
            del maps
            c.delete_group(group=group)
    finally:
        assert sc.terminate() == 0


def test_socket_permissions_metrics_and_graceful_sigterm(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    import urllib.request

    port = kv.free_port()
    sc = kv.start_sidecar(short_tmp, "--metrics-port", str(port), "--budget", "3MiB", prefix=shm_prefix)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert "ghostserve_parity_budget_bytes 3.145728e+06" in resp.read().decode()
    sock = pathlib.Path(sc.address[len("unix://") :])
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750
    with sc.client() as c:
        reply = c.attach(
            group="g", rank=0, world_size=1, layout=kv.LAYOUT, protection=kv.protection("xor", 1)
        )
        assert (pools.SHM_DIR / reply.pool.shm_name).exists()
        assert stat.S_IMODE((pools.SHM_DIR / reply.pool.shm_name).stat().st_mode) == 0o660
    assert sc.terminate() == 0
    assert not sock.exists()
    assert not (pools.SHM_DIR / reply.pool.shm_name).exists()
    lines = [json.loads(line) for line in sc.log.read_text().splitlines() if line.startswith("{")]
    assert any(entry.get("event") == "shutting-down" for entry in lines)


def test_cli_rejects_bad_flags() -> None:
    import logging

    from ghostserve.sidecar import server

    saved = list(logging.getLogger().handlers)
    try:
        assert server.main(["--budget", "lots"]) == 2
        assert server.main(["--listen", "127.0.0.1:1", "--tls-ca", "/nonexistent"]) == 2
        assert server.main(["--shm-prefix", "../etc", "--fake-nvml", "0"]) == 2
        assert server.main(["--socket", "/proc/forbidden/s.sock", "--fake-nvml", "0"]) == 1
    finally:
        logging.getLogger().handlers[:] = saved


def test_cli_refuses_unauthenticated_tcp(capsys: pytest.CaptureFixture[str]) -> None:
    """Plaintext TCP, and TLS that accepts any client, start only when asked for by name (issue 13:
    plaintext TCP started without a warning). Fails before the fix: both started."""
    import logging

    from ghostserve.sidecar import server

    saved = list(logging.getLogger().handlers)
    try:
        assert server.main(["--listen", "127.0.0.1:1", "--fake-nvml", "0"]) == 2
        assert "--insecure" in capsys.readouterr().err
        tls = ["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"]
        assert server.main(["--listen", "127.0.0.1:1", *tls, "--fake-nvml", "0"]) == 2
        assert "--tls-no-client-auth" in capsys.readouterr().err
        assert server.main(["--max-rebuild-streams", "0", "--fake-nvml", "0"]) == 2
        assert server.main(["--max-pool-bytes", "lots", "--fake-nvml", "0"]) == 2
    finally:
        logging.getLogger().handlers[:] = saved
