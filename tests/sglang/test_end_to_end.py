"""Capture, commit, loss of a rank, rebuild and resume with sglang's real classes and real processes.

Two rank processes load the plugin through sglang's loader, get their KV pools from a real sidecar,
serve two requests (chunked prefill, then decode) writing KV with `set_kv_buffer`, and commit chunks.
Rank 1 then fails its event loop with a collective error and must detach and exit with
EXIT_PEER_FAULT. Rank 1's pool is declared lost, rebuilt from rank 0 + parity, and fresh processes of
both ranks read the restorable requests from the sidecar's ledger (DescribeRequest), insert the
restored KV into sglang's radix cache and plan the re-admission.
"""

from __future__ import annotations

import numpy as np
import pytest
import sgl_procs
from ghostserve.sidecar import pools as sidecar_pools

# By distribution, not by import: this folder (tests/sglang) is itself importable as a namespace `sglang`.
if sgl_procs.sglang_version() is None:
    pytest.skip("sglang is not installed (run scripts/setup-sglang.sh)", allow_module_level=True)

import rank_worker
import torch

pytestmark = pytest.mark.sglang
T = 16


def expected_shard(rank: int, rid: str, positions: list[int]) -> np.ndarray:
    """Canonical shard bytes [layer][k|v][token][row] of tokens at `positions`, as the worker wrote them."""
    planes = []
    for layer in range(rank_worker.LAYERS):
        k, v = rank_worker.kv_values(rank, rid, layer, positions)
        planes += [t.view(torch.uint8).reshape(len(positions), -1) for t in (k, v)]
    return torch.stack(planes).numpy()


def pool_rows(desc, rank: int, slots: list[int]) -> np.ndarray:
    """Rank's pool rows at `slots` in canonical shard order, read through the sidecar's pool handle."""
    layout = desc.layout
    row = layout.kv_heads * layout.head_dim * 2  # bf16
    mm, arr = sidecar_pools.map_pool(desc.ranks[rank].pool)
    try:
        return arr.reshape(2 * layout.layers, layout.pool_slots, row)[:, slots, :].copy()
    finally:
        del arr
        mm.close()


def test_capture_loss_rebuild_resume(sidecar: sgl_procs.Sidecar) -> None:
    ranks = [sgl_procs.Rank(sidecar, rank=r, world=2) for r in (0, 1)]
    try:
        check(sidecar, ranks)
    finally:
        for rank in ranks:
            rank.kill()


def check(sidecar: sgl_procs.Sidecar, ranks: list[sgl_procs.Rank]) -> None:
    rep0, rep1 = (rank.report() for rank in ranks)

    # Both ranks made the same scheduling decisions: identical slots, every complete chunk committed.
    reqs0, reqs1 = rep0["requests"], rep1["requests"]
    assert reqs0 == reqs1
    for rid, prompt, _, steps, _ in rank_worker.REQUESTS:
        written = prompt + steps  # KV of the prompt and of every decode input token
        assert reqs0[rid]["committed"] == written // T
    total = sum(r["committed"] for r in reqs0.values())
    assert rep0["chunks_committed"] == rep1["chunks_committed"] == total == 6

    with sidecar.client() as c:
        assert c.flush(sgl_procs.GROUP, wait=60).drained
        desc = c.describe_group(group=sgl_procs.GROUP)
        by_id = {r.request_id: r for r in desc.requests}
        for rid, info in reqs0.items():
            assert by_id[rid].chunks_committed == info["committed"]
            assert by_id[rid].chunks_protected == info["committed"]
            # Rank 0 records the prompt once, with the first chunk; each commit carries only its own T
            # tokens, from which the ledger builds the token list (DescribeRequest, checked below).
            assert by_id[rid].tokens == info["prompt"]
            assert by_id[rid].prompt_tokens == info["prompt"]

        # What set_kv_buffer wrote is in the custody pool, at the committed slots, in contract layout.
        before = {}
        for rid, info in reqs0.items():
            n = info["committed"] * T
            before[rid] = pool_rows(desc, 1, info["slots"][:n])
            np.testing.assert_array_equal(before[rid], expected_shard(1, rid, list(range(n))))

        c.mark_lost(group=sgl_procs.GROUP, ranks=[1], reason="test: Xid 79")
        desc = c.describe_group(group=sgl_procs.GROUP)
        for info in reqs0.values():
            assert not pool_rows(desc, 1, info["slots"][: info["committed"] * T]).any()
        report = c.rebuild(group=sgl_procs.GROUP, lost_ranks=[1])
        assert report.bytes_rebuilt > 0
        assert all(not r.failed_chunks for r in report.requests)
        desc = c.describe_group(group=sgl_procs.GROUP)
        for rid, info in reqs0.items():
            rebuilt = pool_rows(desc, 1, info["slots"][: info["committed"] * T])
            np.testing.assert_array_equal(rebuilt, before[rid])

    # Resume on every rank: a restarted rank maps its pool again and, at scheduler init, reads the
    # restorable requests from the sidecar's ledger (DescribeGroup + DescribeRequest) and inserts them
    # into a fresh radix cache. What it restores is what the ranks committed and rank 0 recorded.
    with sidecar.client() as c:
        for rid, info in reqs0.items():
            n = info["committed"] * T
            led = c.describe_request(group=sgl_procs.GROUP, request_id=rid)
            assert [list(ch.slots) for ch in led.chunks] == [
                info["slots"][i * T : (i + 1) * T] for i in range(info["committed"])
            ]
            assert all(ch.kv_valid for ch in led.chunks)  # rank 1's chunks were all rebuilt
            assert list(led.token_ids) == info["tokens"][:n]
    for rank in ranks:
        rank.send(cmd="resume")
    for rank in ranks:
        rep = rank.report()
        assert set(rep["requests"]) == set(reqs0)
        for rid, info in reqs0.items():
            got = rep["requests"][rid]
            n = info["committed"] * T
            assert got["slots"] == info["slots"][:n]  # the slots every rank committed
            assert got["token_ids"] == info["tokens"][:n]  # the tokens rank 0 recorded with the last commit
            assert got["prompt_tokens"] == info["prompt"]
            assert got["restored_max_new_tokens"] == info["max_new_tokens"]
            # The whole restored prefix is in the tree (and pinned: the ledger points at its slots); sglang
            # must run the last known token again, so a resubmission reuses all but the last page.
            cached = (n - 1) // rank_worker.PAGE * rank_worker.PAGE
            assert got["cached_tokens"] == cached
            assert got["matched"] == n  # match_prefix finds the restored prefix
            assert got["matched_slots"] == info["slots"][:n]  # at the recorded slots
            assert got["kv_equal"], f"rank {rank.rank} {rid}: KV at the restored slots differs"
            generated = n - info["prompt"]
            assert got["max_new_tokens"] == got["gen_max_new_tokens"] == info["max_new_tokens"] - generated
            assert got["gen_rid"] == rid and got["gen_input_len"] == n
        page = rank_worker.PAGE
        total = sum(info["committed"] * T // page * page for info in reqs0.values())
        assert rep["tree_tokens"] == rep["claimed"] == total  # inserted, and taken from the free list

    # A peer dies: rank 1's event loop fails in the collective layer. GhostServe detaches it and exits
    # with EXIT_PEER_FAULT instead of sglang's SIGQUIT to the parent; rank 0 exits normally.
    ranks[1].send(cmd="peer-fault")
    rc1, err1 = ranks[1].finish()
    assert rc1 == 75, err1
    assert "peer rank failure" in err1
    ranks[0].kill()  # SIGKILL: no cleanup code of the rank runs
    assert ranks[0].proc.returncode == -9
    with sidecar.client() as c:
        desc = c.describe_group(group=sgl_procs.GROUP)
    state = {r.rank: r for r in desc.ranks}
    assert not state[1].attached and state[1].pool_valid  # detached, its pool kept in custody
    assert state[0].pool_valid
    for rid, info in reqs0.items():  # rank 0's KV outlived its SIGKILLed process
        n = info["committed"] * T
        kept = pool_rows(desc, 0, info["slots"][:n])
        np.testing.assert_array_equal(kept, expected_shard(0, rid, list(range(n))))
