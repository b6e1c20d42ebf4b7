"""The ledger (pure): commits from every rank complete a chunk; bad input changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from ghostserve.sidecar import errors, ledger


def mk(n: int = 3) -> ledger.Ledger:
    return ledger.Ledger(world_size=n, chunk_tokens=4, pool_slots=32)


def a(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def test_chunk_completes_when_every_rank_committed_identical_slots() -> None:
    lg = mk()
    states = []
    for rank in (2, 0, 1):
        chunk, done = lg.commit(
            rank, "r", 0, slots=a(4, 5, 6, 7), token_ids=a(1, 2, 3, 4) if rank == 0 else a()
        )
        states.append((chunk.state, done))
    assert states == [
        (ledger.State.WAITING_FOR_RANKS, False),
        (ledger.State.WAITING_FOR_RANKS, False),
        (ledger.State.QUEUED, True),
    ]
    assert chunk.token_ids.tolist() == [1, 2, 3, 4]
    # A retry after completion is accepted and does not complete the chunk twice.
    assert lg.commit(1, "r", 0, slots=a(4, 5, 6, 7), token_ids=a()) == (chunk, False)


@pytest.mark.parametrize(
    ("rank", "slots", "tokens", "match"),
    [
        (3, a(4, 5, 6, 7), a(), "rank 3 out of range"),
        (1, a(4, 5, 6, 8), a(), "differ"),
        (1, a(4, 5, 6), a(), "4 slots"),
        (1, a(4, 5, 6, 99), a(), "out of range"),
        (1, a(-1, 5, 6, 7), a(), "slot -1 out of range"),
        (1, a(7, 5, 6, 7), a(), "repeat"),
        (1, a(4, 4, 6, 7), a(), "repeat"),
        (1, a(4, 5, 6, 7), a(9, 9, 9, 9), "different token ids"),
        (1, a(4, 5, 6, 7), a(1, 2), "token_ids"),
    ],
)
def test_bad_commits_raise_and_change_nothing(
    rank: int, slots: np.ndarray, tokens: np.ndarray, match: str
) -> None:
    lg = mk()
    chunk, _ = lg.commit(0, "r", 0, slots=a(4, 5, 6, 7), token_ids=a(1, 2, 3, 4))
    with pytest.raises(errors.InvalidArgument, match=match):
        lg.commit(rank, "r", 0, slots=slots, token_ids=tokens)
    assert chunk.committed == {0} and chunk.slots.tolist() == [4, 5, 6, 7] and list(lg.requests) == ["r"]


def test_bad_request_ids_and_huge_chunk_indices_are_rejected() -> None:
    lg = mk()
    for rid in ("", "has space", "x" * 257, "é"):
        with pytest.raises(errors.InvalidArgument):
            lg.commit(0, rid, 0, slots=a(0, 1, 2, 3), token_ids=a())
    with pytest.raises(errors.InvalidArgument, match="beyond"):
        lg.commit(0, "r", 2**31, slots=a(0, 1, 2, 3), token_ids=a())
    assert lg.requests == {}


def test_committed_prefix_tail_and_lost_rank_commits() -> None:
    lg = mk(2)
    for c in (0, 1, 3):
        for r in (0, 1):
            lg.commit(r, "r", c, slots=a(4 * c, 4 * c + 1, 4 * c + 2, 4 * c + 3), token_ids=a())
    lg.commit(0, "r", 2, slots=a(20, 21, 22, 23), token_ids=a())
    req = lg.get("r")
    assert req.committed_chunks() == 2  # chunk 2 waits for rank 1
    lg.record_tokens("r", np.arange(19, dtype=np.int64), prompt_tokens=5)
    assert lg.tail_tokens(req) == 11
    lg.drop_rank_commits({0})
    assert req.chunks[2].committed == set()
    with pytest.raises(errors.InvalidArgument):
        lg.record_tokens("r", np.arange(3, dtype=np.int64), prompt_tokens=4)
    assert lg.get("r").prompt_tokens == 5
    lg.release("r")
    with pytest.raises(errors.NotFound):
        lg.release("r")
