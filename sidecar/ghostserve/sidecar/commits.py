"""Commits and the rest of the ledger's life: a rank commits a chunk, the completing commit reserves
parity and queues the encode; tokens are recorded; requests are released and chunks dropped.

The ledger's memory is charged to the parity budget (`budget.request_bytes`/`chunk_bytes`) before it
is taken, so a client cannot grow the sidecar past its budget with commits or RecordTokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from ghostserve.sidecar import budget, encode, errors, group, ledger
from ghostserve.sidecar.host import Host

log = logging.getLogger("ghostserve.sidecar")


def request_cost(req: ledger.Request) -> int:
    """Ledger memory of a request and all its chunks (what the budget was charged for it)."""
    return budget.request_bytes(req.tokens) + sum(
        budget.chunk_bytes(ch.slots, ch.token_ids) for ch in req.chunks.values()
    )


def _commit_cost(g: group.Group, request_id: str, index: int) -> int:
    """The part of `request_cost` a commit of chunk `index` can change (the request's record and that
    chunk): O(1), where the whole request's cost is O(chunks) and a long request has thousands."""
    req = g.ledger.requests.get(request_id)
    if req is None:
        return 0
    chunk = req.chunks.get(index)
    own = budget.chunk_bytes(chunk.slots, chunk.token_ids) if chunk is not None else 0
    return budget.request_bytes(req.tokens) + own


def chunk_record(request_id: str, chunk: ledger.Chunk) -> dict[str, Any]:
    """The journal line of a completed chunk."""
    return {
        "op": "chunk",
        "r": request_id,
        "c": chunk.index,
        "s": chunk.slots.tolist(),
        "t": chunk.token_ids.tolist(),
    }


def _charge(c: Host, nbytes: int) -> None:
    with c.lock:
        c.store.charge(nbytes, tokens_of=c.tokens_of, on_evict=c.on_evict)


def commit_chunk(
    c: Host,
    name: str,
    rank: int,
    request_id: str,
    chunk_index: int,
    *,
    slots: npt.NDArray[np.int64],
    token_ids: npt.NDArray[np.int64],
) -> ledger.State:
    """Record one rank's commit; the commit that completes a chunk queues its encode (never waits).

    Raises NotFound, InvalidArgument, FailedPrecondition (rank not attached), ResourceExhausted (the
    ledger record does not fit the budget) without changing anything; ResourceExhausted when parity
    does not fit and nothing can be evicted — the chunk is then recorded as committed and unprotected."""
    with c.locked(name) as g:
        rp = g.check_rank(rank)
        if not rp.attached:
            raise errors.FailedPrecondition(f"rank {rank} of {name!r} has no worker attached")
        req = g.ledger.requests.get(request_id)
        before = _commit_cost(g, request_id, chunk_index)
        upfront = budget.chunk_bytes(slots, token_ids) + (budget.REQUEST_OVERHEAD if req is None else 0)
        _charge(c, upfront)
        try:
            chunk, done = g.ledger.commit(rank, request_id, chunk_index, slots=slots, token_ids=token_ids)
        except BaseException:
            with c.lock:
                c.store.uncharge(upfront)
            raise
        after = _commit_cost(g, request_id, chunk_index)
        with c.lock:
            c.store.uncharge(upfront - (after - before))
        if done:
            if c.journal:
                journal_append(c, g, chunk_record(request_id, chunk))
            protect(c, g, request_id, chunk)
        return chunk.state


# One chunk of a CommitChunks call: (request id, chunk index, slots, token ids), or the error its
# decoding met (reported for that chunk alone).
Commit = tuple[str, int, npt.NDArray[np.int64], npt.NDArray[np.int64]] | errors.SidecarError


def commit_chunks(c: Host, name: str, rank: int, items: Sequence[Commit]) -> list[ledger.State | Exception]:
    """`commit_chunk` for each item, in order; an item's error is its result and the next item goes on.

    Raises NotFound / FailedPrecondition (rank not attached) before committing anything, so a whole
    call that cannot be served changes nothing (the engine re-attaches and sends it again)."""
    with c.locked(name) as g:
        if not g.check_rank(rank).attached:
            raise errors.FailedPrecondition(f"rank {rank} of {name!r} has no worker attached")
    out: list[ledger.State | Exception] = []
    for item in items:
        if isinstance(item, Exception):
            out.append(item)
            continue
        request_id, index, slots, tokens = item
        try:
            out.append(commit_chunk(c, name, rank, request_id, index, slots=slots, token_ids=tokens))
        except errors.SidecarError as exc:
            out.append(exc)
        except Exception as exc:  # a bug for one chunk must not hide what happened to the others
            log.exception("commit-failed", extra={"group": name, "request": request_id})
            out.append(exc)
    return out


def protect(c: Host, g: group.Group, request_id: str, chunk: ledger.Chunk) -> None:
    """Reserve parity for a completed chunk and queue its encode. Caller holds g.lock."""
    if g.protection.code == "none":
        return c.unprotect(chunk, ledger.Failure.NOT_PROTECTED, "code-none")
    if not g.healthy():
        return c.unprotect(chunk, ledger.Failure.NOT_PROTECTED, "pool-invalid")
    with c.lock:
        if g.budget_bytes:

            def mine(o: object) -> bool:
                return isinstance(o, tuple) and o[0] == g.name

            # Over its own budget a group gives up its own least valuable requests' parity first (the
            # global policy, within the group); the chunk's own request is never its own victim.
            while (held := c.store.held_where(mine)) + g.parity_nbytes > g.budget_bytes:
                if not c.store.evict_least_valuable(
                    mine, exclude=g.owner(request_id), tokens_of=c.tokens_of, on_evict=c.on_evict
                ):
                    c.unprotect(chunk, ledger.Failure.NOT_PROTECTED, "group-budget-full")
                    raise errors.ResourceExhausted(
                        f"group {g.name!r} holds {held} B of parity, its budget is {g.budget_bytes} B"
                    )
        try:
            item = c.store.reserve(
                g.owner(request_id),
                chunk.index,
                g.parity_nbytes,
                tokens_of=c.tokens_of,
                on_evict=c.on_evict,
            )
        except errors.ResourceExhausted:
            c.unprotect(chunk, ledger.Failure.NOT_PROTECTED, "budget-full")
            raise
    arrays = [rp.segment.array for rp in g.ranks if rp.segment is not None]
    job = encode.EncodeJob(c, g, request_id, chunk, item, arrays, generations=g.generations())
    if not c.queue.submit(g.name, job.run):
        with c.lock:
            c.store.release(g.owner(request_id), chunk.index)
        c.unprotect(chunk, ledger.Failure.NOT_PROTECTED, "encoder-behind")
    c.sync_gauges()


def record_tokens(
    c: Host,
    name: str,
    request_id: str,
    tokens: npt.NDArray[np.int64],
    *,
    prompt_tokens: int,
    max_new_tokens: int = 0,
) -> None:
    """Replace a request's token list. Raises NotFound, InvalidArgument, ResourceExhausted (does not
    fit the budget), changing nothing."""
    with c.locked(name) as g:
        req = g.ledger.requests.get(request_id)
        old = budget.request_bytes(req.tokens) if req is not None else 0
        new = budget.request_bytes(tokens)
        if new > old:
            _charge(c, new - old)
        try:
            g.ledger.record_tokens(
                request_id, tokens, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens
            )
        except BaseException:
            with c.lock:
                c.store.uncharge(new - old)
            raise
        if new < old:
            with c.lock:
                c.store.uncharge(old - new)


def release_request(c: Host, name: str, request_id: str) -> int:
    """Forget a finished request; returns parity bytes freed. Raises NotFound."""
    with c.locked(name) as g:
        req = g.ledger.release(request_id)
        if c.journal:
            journal_append(c, g, {"op": "release", "r": request_id})
        with c.lock:
            freed = c.store.release(g.owner(request_id))
            c.store.uncharge(request_cost(req))
        if c.spill:
            c.spill.delete_request(name, request_id)
        c.sync_gauges()
        return freed


def drop_chunk(c: Host, g: group.Group, request_id: str, index: int) -> None:
    """Forget one chunk (the engine will recompute and recommit it). Caller holds g.lock."""
    req = g.ledger.requests.get(request_id)
    if req is None or index not in req.chunks:
        return
    chunk = req.chunks.pop(index)
    if c.journal:
        journal_append(c, g, {"op": "drop", "r": request_id, "c": index})
    with c.lock:
        c.store.release(g.owner(request_id), index)
        c.store.uncharge(budget.chunk_bytes(chunk.slots, chunk.token_ids))
    if c.spill:
        c.spill.delete_chunk(g.name, request_id, index)


def journal_append(c: Host, g: group.Group, record: dict[str, Any]) -> None:
    """Append to the group's journal, compacting it (rewritten from the ledger) once it holds many
    more lines than live chunks: a long-running sidecar's journal stays proportional to its ledger.
    Caller holds g.lock."""
    assert c.journal is not None
    c.journal.append(g.name, record)
    live = sum(len(r.chunks) for r in g.ledger.requests.values())
    if c.journal.lines(g.name) > live + c.config.journal_compact_records:
        compact_journal(c, g)


def compact_journal(c: Host, g: group.Group) -> None:
    """Rewrite the group's journal with one line per complete chunk. Caller holds g.lock."""
    assert c.journal is not None
    records = [
        chunk_record(rid, ch)
        for rid, req in g.ledger.requests.items()
        for ch in sorted(req.complete_chunks(), key=lambda ch: ch.index)
    ]
    c.journal.rewrite(g.name, records)
    log.info("journal-compacted", extra={"group": g.name, "records": len(records)})
