"""The sidecar glue every engine adapter shares, against a real sidecar process on a Unix socket."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ghostserve.engine import adapter
from ghostserve.kernels import layout as layout_mod
from ghostserve.sidecar import client as client_mod
from ghostserve.sidecar import pools
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.wire import layout as wire_layout
from ghostserve.wire import protection as wire_protection

LAYOUT = layout_mod.KVLayout(layers=2, kv_heads=1, head_dim=8, dtype="float32", page_size=4, pool_slots=64)
PROT = adapter.Protection("xor", chunk_tokens=4)


def _sessions(client: client_mod.SidecarClient, group: str, world: int = 2) -> list[adapter.SidecarSession]:
    return [
        adapter.SidecarSession(
            client, group, rank=r, world_size=world, layout=LAYOUT, protection=PROT, worker_id=f"w{r}"
        )
        for r in range(world)
    ]


def test_attach_commit_record_release(sidecar, no_shm_leak):
    with client_mod.SidecarClient(sidecar.address) as client:
        sessions = _sessions(client, "ad/a")
        results = [s.attach() for s in sessions]
        assert all(r.created and not r.needs_rebuild for r in results)
        assert results[0].pool.nbytes == LAYOUT.pool_nbytes
        # Writing through the worker's own mapping is what the sidecar encodes from.
        mm, buf = pools.map_pool(results[0].pool)
        buf[:16] = 7
        for s in sessions:
            assert s.commit("r1", 0, [0, 1, 2, 3], [5, 6, 7, 8])
        assert sessions[0].commit("r1", 0, [0, 1, 2, 3], [5, 6, 7, 8])  # repeated commit is accepted
        assert sessions[0].record_tokens("r1", [5, 6, 7, 8, 9], prompt_tokens=3, max_new_tokens=7)
        client.flush("ad/a", wait=30.0)
        desc = client.describe_group(group="ad/a")
        [req] = desc.requests
        assert (req.chunks_committed, req.chunks_protected, req.tokens, req.prompt_tokens) == (1, 1, 5, 3)
        entry = client.describe_request(group="ad/a", request_id="r1")
        assert (list(entry.token_ids), entry.max_new_tokens) == ([5, 6, 7, 8, 9], 7)
        assert sessions[0].release("r1") > 0
        assert sessions[0].release("r1") == 0  # unknown now: nothing to free
        del buf
        mm.close()
        client.delete_group(group="ad/a")


def test_commit_with_other_slots_is_rejected(sidecar, no_shm_leak):
    with client_mod.SidecarClient(sidecar.address) as client:
        a, b = _sessions(client, "ad/b")
        a.attach()
        b.attach()
        assert a.commit("r", 0, [0, 1, 2, 3], [1, 1, 1, 1])
        with pytest.raises(adapter.AdapterError):
            b.commit("r", 0, [4, 5, 6, 7], [1, 1, 1, 1])
        client.delete_group(group="ad/b")


def test_sidecar_down_then_restarted(sidecar, no_shm_leak):
    with client_mod.SidecarClient(sidecar.address, timeout=5.0) as client:
        sessions = _sessions(client, "ad/c")
        pool = [s.attach().pool for s in sessions]
        fresh = []

        def reconnect() -> client_mod.SidecarClient:
            fresh.append(client_mod.SidecarClient(sidecar.address, timeout=5.0))
            return fresh[-1]

        for s in sessions:
            s._reconnect = reconnect
        sidecar.kill()
        # Serving goes on unprotected while the sidecar is down; the session dials a fresh channel.
        assert not sessions[0].commit("r", 0, [0, 1, 2, 3], [1, 2, 3, 4])
        assert sessions[0].commits_failed == 1
        assert sessions[0].client is fresh[0]
        assert not sessions[0].record_tokens("r", [1, 2, 3, 4], prompt_tokens=4)
        sidecar.start()
        # The new sidecar re-adopted the pools but forgot the workers: the session attaches again.
        for s in sessions:
            assert s.commit("r", 0, [0, 1, 2, 3], [1, 2, 3, 4])
            assert s.reattaches == 1
        assert [getattr(s.pool, "shm_name", None) for s in sessions] == [p.shm_name for p in pool]
        after = sessions[0].client  # the shared client tried the dead sidecar: in reconnect backoff
        after.flush("ad/c", wait=30.0)
        assert after.describe_group(group="ad/c").requests[0].chunks_protected == 1
        after.delete_group(group="ad/c")
        for c in fresh:  # the sessions own the fresh clients they dialled
            c.close()


def test_pool_replaced_after_restart_is_reported(sidecar, no_shm_leak):
    with client_mod.SidecarClient(sidecar.address) as client:
        a, b = _sessions(client, "ad/d")
        a.attach()
        b.attach()
        client.mark_lost(group="ad/d", ranks=[0], reason="test")
        sidecar.kill()
        sidecar.start()
        with pytest.raises(adapter.PoolChangedError):
            a.commit("r", 0, [0, 1, 2, 3], [1, 2, 3, 4])
        client.delete_group(group="ad/d")


def test_protection_and_layout_conversion():
    assert adapter.Protection("rdp").m == 2 and adapter.Protection("rs", 3).m == 3
    assert wire_protection.protection_to(adapter.Protection("xor")).code == pb.XOR
    with pytest.raises(ValueError):
        adapter.Protection("raid6")
    with pytest.raises(ValueError):
        adapter.Protection("xor", chunk_tokens=0)
    proto = wire_layout.layout_to(LAYOUT)
    assert (proto.layers, proto.kv_heads, proto.head_dim, proto.dtype, proto.pool_slots) == (
        2,
        1,
        8,
        pb.FLOAT32,
        64,
    )


def test_adapter_module_does_not_import_torch():
    code = "import sys, ghostserve.engine.adapter, ghostserve.engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
