"""Chunk capture after each forward pass: which tokens a batch wrote, and commits of complete chunks.

Reads only what sglang's ScheduleBatch already holds on the CPU side (requests, forward mode, prefix
and extend lengths, seq_lens_cpu) plus `out_cache_loc`, the slots the pass wrote. That works with CUDA
graphs and every attention backend, unlike hooking `set_kv_buffer`, which graph replays skip.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, overload

from ghostserve.engine.sglang import chunks

log = logging.getLogger(__name__)


class SpeculativeDecodingError(RuntimeError):
    """Speculative decoding writes draft KV that may be rejected; GhostServe does not protect it yet."""


def written_spans(batch: Any) -> list[tuple[Any, int, list[int]]]:
    """(request, first written token index, slots) for every request of a forward batch.

    Extend and mixed batches wrote `extend_lens[i]` tokens after `prefix_lens[i]`; decode batches wrote
    one token at index seq_len - 1. Idle and other modes wrote nothing. Raises SpeculativeDecodingError
    for batches of a speculative algorithm and ValueError when `out_cache_loc` does not cover the batch.
    """
    spec = getattr(batch, "spec_algorithm", None)
    if spec is not None and not spec.is_none():
        raise SpeculativeDecodingError(
            f"speculative decoding ({spec}) is not supported by GhostServe: draft KV written for rejected "
            "tokens would be committed as protected. Serve without --speculative-algorithm."
        )
    mode = batch.forward_mode
    reqs = list(batch.reqs)
    if batch.out_cache_loc is None or not reqs:
        return []
    if mode.is_extend():
        starts = [int(x) for x in batch.prefix_lens]
        lengths = [int(x) for x in batch.extend_lens]
    elif mode.is_decode():
        starts = [int(x) - 1 for x in batch.seq_lens_cpu.tolist()]
        lengths = [1] * len(reqs)
    else:
        return []
    locs = [int(x) for x in batch.out_cache_loc.tolist()]
    if len(locs) != sum(lengths):
        raise ValueError(f"out_cache_loc holds {len(locs)} slots, the batch wrote {sum(lengths)} tokens")
    spans = []
    offset = 0
    for req, start, n in zip(reqs, starts, lengths, strict=True):
        spans.append((req, start, locs[offset : offset + n]))
        offset += n
    return spans


class TokenView(Sequence[int]):
    """A request's token ids known on the CPU (prompt then generated) without copying them: a forward
    pass only reads the few tokens of the chunks it completes, not the whole list."""

    def __init__(self, req: Any, *, limit: int | None = None) -> None:
        self._prompt = req.origin_input_ids
        self._output = req.output_ids
        self._n = len(self._prompt)
        self._limit = limit

    def __len__(self) -> int:
        known = self._n + len(self._output)
        return known if self._limit is None else min(known, self._limit)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, int):
            i = index + len(self) if index < 0 else index
            return int(self._prompt[i]) if i < self._n else int(self._output[i - self._n])
        begin, end, step = index.indices(len(self))
        if step != 1:
            raise ValueError("TokenView slices have step 1")
        head = [int(x) for x in self._prompt[begin : min(end, self._n)]]
        tail = [int(x) for x in self._output[max(0, begin - self._n) : max(0, end - self._n)]]
        return head + tail


def request_tokens(req: Any) -> list[int]:
    """Token ids of a request known on the CPU: prompt then generated (a copy)."""
    return TokenView(req)[:]


def capture_batch(
    batch: Any,
    *,
    tracker: chunks.ChunkTracker,
    req_to_token: Any,
    commit: Callable[[chunks.Chunk, Any], None],
    skip: Callable[[Any], bool] = lambda req: False,
) -> int:
    """Feed one finished forward pass to `tracker` and `commit(chunk, req)` every chunk it completed.

    `req_to_token` is sglang's ReqToTokenPool.req_to_token ([rows][max_context] slot table), read for
    prefixes the tracker did not see written. Requests for which `skip(req)` holds are left out
    (served unprotected). Chunks are committed once each, in index order, with their slots read from
    `req_to_token` at that moment. A chunk holding tokens an extend pass just wrote waits for the
    request's next pass: after an extend pass sglang may re-point those tokens at the radix cache's
    own slots for the same tokens and free the ones just written (`cache_unfinished_req`). Mutates the
    tracker. Returns the number of chunks committed.
    """
    committed = 0
    extend = batch.forward_mode.is_extend()
    for req, start, slots in written_spans(batch):
        if skip(req):
            continue
        row = req.kv.req_pool_idx

        def prefix(begin: int, end: int, row: int = row) -> list[int]:
            return [int(x) for x in req_to_token[row, begin:end].tolist()]

        tracker.observe(req.rid, start=start, new_slots=slots, prefix_slots=prefix)
        t = tracker.chunk_tokens
        for chunk in tracker.ready(req.rid, TokenView(req, limit=start if extend else None)):
            fresh = tuple(prefix(chunk.index * t, (chunk.index + 1) * t))
            commit(dataclasses.replace(chunk, slots=fresh), req)
            committed += 1
    return committed
