"""A rank lost while its chunk waits in the encode queue: on a real device fault the encode would read
dead memory, so the chunk must end unprotected (recomputed later), never protected by parity computed
from it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import coding, config, core, group, ledger, recovery

LAYOUT = kvlayout.KVLayout(layers=2, kv_heads=2, head_dim=8, dtype="float16", page_size=4, pool_slots=32)


@pytest.fixture
def custodian(shm_prefix: str) -> Iterator[core.Custodian]:
    c = core.Custodian(config.Config(budget_bytes=1 << 20, encode_workers=1, shm_prefix=shm_prefix))
    yield c
    c.close()


def test_chunk_queued_when_its_rank_is_lost_ends_unprotected(custodian: core.Custodian) -> None:
    settings = group.Settings(
        world_size=3, layout=LAYOUT, protection=coding.Protection(code="xor", parity_shards=1, chunk_tokens=4)
    )
    for rank in range(3):
        custodian.attach("g", rank, settings, worker_id=f"w{rank}")
        segment = custodian.groups["g"].ranks[rank].segment
        assert segment is not None
        segment.array[:] = np.random.default_rng(rank).integers(0, 256, LAYOUT.pool_nbytes, dtype=np.uint8)
    gate, started = threading.Event(), threading.Event()

    def hold_the_encoder() -> None:
        started.set()
        gate.wait(30)

    assert custodian.queue.submit("g", hold_the_encoder) and started.wait(30)
    slots, tokens = np.arange(4, dtype=np.int64), np.arange(4, dtype=np.int64)
    for rank in range(3):
        custodian.commit_chunk("g", rank, "req", 0, slots=slots, token_ids=tokens)
    chunk = custodian.groups["g"].ledger.get("req").chunks[0]
    assert chunk.state == ledger.State.QUEUED
    custodian.mark_lost("g", [1], reason="test: Xid 79 while the chunk was queued")
    gate.set()
    drained, pending = custodian.flush("g", timeout=30)
    assert drained and pending == 0
    assert chunk.state == ledger.State.UNPROTECTED and chunk.failure == ledger.Failure.NOT_PROTECTED
    assert custodian.store.held_bytes == 0
    report = recovery.rebuild(custodian, "g", [1], request_ids=[], first_chunk={})
    assert report.bytes_rebuilt == 0 and [r.rebuilt for r in report.requests] == [[]]
    assert [f for r in report.requests for f, _ in r.failed] == [0]
