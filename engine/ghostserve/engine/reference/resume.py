"""Resubmitted requests: how much KV the sidecar still holds for them can be reused (pure functions).

A client (the gateway) that lost its stream resubmits the request with the same rid and
``input_ids`` = prompt + the tokens it received. The engine keeps such a request's KV *held* meanwhile:
its pages stay reserved and its ledger entry stays in the sidecar. On resubmission the KV of positions
``[0, reuse)`` is reused and the rest is recomputed exactly as first computed (the original prompt
length fixes the prefill pieces), so the continuation is token for token the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


class ResumeError(ValueError):
    """A ledger entry the engine cannot map back onto its pages (it is released instead)."""


@dataclasses.dataclass(frozen=True)
class LedgerChunk:
    index: int
    slots: tuple[int, ...]
    kv_valid: bool  # every rank's pool holds this chunk's KV now


def valid_prefix(chunks: Sequence[LedgerChunk], chunk_tokens: int) -> int:
    """Tokens covered by the chunks 0, 1, ... that are all valid (KV in every rank's pool)."""
    by_index = {c.index: c for c in chunks}
    n = 0
    while n in by_index and by_index[n].kv_valid and len(by_index[n].slots) == chunk_tokens:
        n += 1
    return n * chunk_tokens


def page_layout(chunks: Sequence[LedgerChunk], *, page_size: int, chunk_tokens: int) -> list[int | None]:
    """The request's pages in position order as far as the ledger knows them (None: a chunk the ledger
    does not list, e.g. dropped after a rebuild; a fresh page is taken for it).

    Every listed chunk keeps its slots: the sidecar refuses a commit of a chunk with other slots, and a
    later rebuild writes exactly those slots. Raises ResumeError when a chunk is not whole pages in order.
    """
    if chunk_tokens % page_size:
        raise ResumeError(f"chunk tokens {chunk_tokens} is not a multiple of the page size {page_size}")
    per_chunk = chunk_tokens // page_size
    by_index = {c.index: c for c in chunks}
    if not by_index:
        return []
    layout: list[int | None] = []
    for idx in range(max(by_index) + 1):
        chunk = by_index.get(idx)
        if chunk is None:
            layout += [None] * per_chunk
            continue
        if len(chunk.slots) != chunk_tokens:
            raise ResumeError(f"chunk {idx} lists {len(chunk.slots)} slots, expected {chunk_tokens}")
        for j in range(per_chunk):
            page = chunk.slots[j * page_size] // page_size
            if list(chunk.slots[j * page_size : (j + 1) * page_size]) != list(
                range(page * page_size, (page + 1) * page_size)
            ):
                raise ResumeError(f"chunk {idx}: slots are not whole pages in order")
            layout.append(page)
    pages = [p for p in layout if p is not None]
    if len(pages) != len(set(pages)):
        raise ResumeError("two chunks share a page")
    return layout


def reuse(
    input_ids: Sequence[int],
    *,
    prompt_len: int,
    known_tokens: Sequence[int],
    valid_len: int,
    chunk_tokens: int,
) -> int | None:
    """Positions whose KV a resubmission reuses, or None when ``input_ids`` is not this request
    (its prompt differs from the held one, or it disagrees with the tokens the engine produced).

    known_tokens: the held request's tokens (prompt + generated, as far as known); valid_len: positions
    [0, valid_len) hold valid KV. The result is cut so that recompute starts where an original forward
    pass started (a chunk boundary inside the prompt, any position after it) and leaves at least the
    last input token to compute (its logits give the next token).
    """
    if prompt_len <= 0 or len(input_ids) < prompt_len or len(known_tokens) < prompt_len:
        return None
    common = 0
    for a, b in zip(input_ids, known_tokens, strict=False):
        if a != b:
            break
        common += 1
    if common < prompt_len:
        return None
    if common < min(len(input_ids), len(known_tokens)):
        return None  # the client's continuation is not what this engine generated
    n = min(valid_len, common, len(input_ids) - 1)
    if n < prompt_len:
        n -= n % chunk_tokens
    return max(0, n)
