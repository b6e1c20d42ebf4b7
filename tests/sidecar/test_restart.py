"""Sidecar restarts. Pools are shared-memory segments that outlive the sidecar process and are
re-adopted from the state file; the ledger journal brings back which chunks exist; parity survives only
with a spill directory — without one the chunks are reported unprotected (the engine recomputes them).
Never a wrong rebuild."""

from __future__ import annotations

import pathlib

import kv
import numpy as np
import pytest
from ghostserve.sidecar import pools

N, CODE, M, GROUP = 3, "xor", 1, "restart/g"
SLOTS = [[5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43, 44, 45, 46, 47], list(range(100, 116))]


def populate(sc: kv.Sidecar) -> list[str]:
    names = []
    with sc.client() as c:
        for r in range(N):
            reply = c.attach(
                group=GROUP, rank=r, world_size=N, layout=kv.LAYOUT, protection=kv.protection(CODE, M)
            )
            mm, pool = pools.map_pool(reply.pool)
            pool[:] = kv.pool_content(r, pool.size)
            del pool
            mm.close()
            names.append(reply.pool.shm_name)
        for idx, slots in enumerate(SLOTS):
            for r in range(N):
                c.commit_chunk(group=GROUP, rank=r, request_id="long", chunk_index=idx, slots=slots)
        assert c.flush(GROUP, wait=30).drained
    return names


def check_pool(desc, rank: int) -> None:
    mm, pool = pools.map_pool(desc.ranks[rank].pool)
    want = kv.pool_content(rank, pool.size)
    for slots in SLOTS:
        assert np.array_equal(kv.shard(pool, slots), kv.shard(want, slots))
    del pool
    mm.close()


@pytest.mark.parametrize("spill", [True, False])
def test_crash_then_restart_readopts_pools(short_tmp: pathlib.Path, shm_prefix: str, spill: bool) -> None:
    extra = ["--spill-dir", str(short_tmp / "spill")] if spill else []
    sc = kv.start_sidecar(short_tmp, *extra, prefix=shm_prefix)
    names = populate(sc)
    sc.kill()  # crash: nothing is cleaned up
    assert all((pools.SHM_DIR / n).exists() for n in names)
    sc = kv.start_sidecar(short_tmp, *extra, name="sidecar2", prefix=shm_prefix)
    try:
        with sc.client() as c:
            desc = c.describe_group(group=GROUP)
            assert [r.pool.shm_name for r in desc.ranks] == names
            assert all(r.pool_valid and not r.attached for r in desc.ranks)
            # A worker re-attaches with the same settings and gets its old pool back.
            again = c.attach(
                group=GROUP, rank=0, world_size=N, layout=kv.LAYOUT, protection=kv.protection(CODE, M)
            )
            assert again.pool.shm_name == names[0] and not again.created and not again.needs_rebuild
            for r in range(N):
                check_pool(desc, r)
            c.mark_lost(group=GROUP, ranks=[1], reason="test")
            report = c.rebuild(group=GROUP, lost_ranks=[1])
            if spill:
                assert desc.requests[0].chunks_protected == 2
                assert sorted(report.requests[0].rebuilt_chunks) == [0, 1]
                check_pool(c.describe_group(group=GROUP), 1)
            else:
                # No spill: the parity died with the process. The journal still knows the chunks, so
                # they are reported unprotected and nothing is claimed rebuilt.
                (req,) = desc.requests
                assert (req.chunks_committed, req.chunks_protected) == (2, 0)
                assert report.bytes_rebuilt == 0
                assert [(f.chunk_index, f.reason) for f in report.requests[0].failed_chunks] == [
                    (0, 1),
                    (1, 1),
                ]
            c.delete_group(group=GROUP)
    finally:
        assert sc.terminate() == 0
    assert not any((pools.SHM_DIR / n).exists() for n in names)
    assert sorted(p.name for p in (short_tmp / "run").iterdir()) == []  # no state, journal or socket left


def test_keep_pools_survives_graceful_restart(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    spill = ["--spill-dir", str(short_tmp / "spill")]
    sc = kv.start_sidecar(short_tmp, "--keep-pools", *spill, prefix=shm_prefix)
    names = populate(sc)
    assert sc.terminate() == 0
    assert all((pools.SHM_DIR / n).exists() for n in names)
    sc = kv.start_sidecar(
        short_tmp, *spill, name="sidecar2", prefix=shm_prefix
    )  # no --keep-pools: this one frees on exit
    try:
        with sc.client() as c:
            desc = c.describe_group(group=GROUP)
            assert desc.requests[0].chunks_protected == 2
            for r in range(N):
                check_pool(desc, r)
    finally:
        assert sc.terminate() == 0
    assert not any((pools.SHM_DIR / n).exists() for n in names)
    assert not list((short_tmp / "spill").rglob("*.bin"))


def test_tampered_spill_is_reported_not_rebuilt(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    spill_dir = short_tmp / "spill"
    sc = kv.start_sidecar(short_tmp, "--spill-dir", str(spill_dir), prefix=shm_prefix)
    populate(sc)
    sc.kill()
    victim = sorted(spill_dir.rglob("1.bin"))[0]
    data = bytearray(victim.read_bytes())
    data[17] ^= 0x40
    victim.write_bytes(bytes(data))
    sc = kv.start_sidecar(short_tmp, "--spill-dir", str(spill_dir), name="sidecar2", prefix=shm_prefix)
    try:
        with sc.client() as c:
            c.mark_lost(group=GROUP, ranks=[2], reason="test")
            report = c.rebuild(group=GROUP, lost_ranks=[2])
            (req,) = report.requests
            assert list(req.rebuilt_chunks) == [0]
            assert [(f.chunk_index, f.reason) for f in req.failed_chunks] == [(1, 3)]  # CHECKSUM_MISMATCH
            desc = c.describe_group(group=GROUP)
            mm, pool = pools.map_pool(desc.ranks[2].pool)
            assert not kv.shard(pool, SLOTS[1]).any()  # the wrong bytes were never written
            del pool
            mm.close()
            c.delete_group(group=GROUP)
    finally:
        assert sc.terminate() == 0
