"""Resume after a rebuild: put restored KV back into sglang's radix cache and plan the re-admission.

After a rebuild every rank's pool (in sidecar custody) again holds each request's KV at the slots
recorded when its chunks were committed; the sidecar's ledger (DescribeRequest) says which chunks
those are, with the request's tokens and budget. A restarted scheduler has an empty allocator and
tree, so on every rank: the slots are taken out of the allocator's free list, the token prefix is
inserted into the radix cache with those slots as values, and the request is re-admitted as prompt +
generated tokens with max_new_tokens reduced by what was generated. sglang then matches the restored
prefix and recomputes only the tokens after it (the last partial page and the unprotected tail).
"""

from __future__ import annotations

import array
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grpc
import torch
from ghostserve.sidecar import client as client_mod
from ghostserve.v1 import sidecar_pb2 as pb
from sglang.srt.managers import io_struct
from sglang.srt.mem_cache import base_prefix_cache, radix_cache

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """The restored request cannot be placed: slots in use, out of range, or inconsistent lengths."""


@dataclasses.dataclass(frozen=True)
class RestoredRequest:
    """One request whose KV for tokens [0, len(slots)) is in place in every rank's pool."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt + generated so far
    prompt_tokens: int
    slots: tuple[int, ...]  # pool slot of each restored token, in token order
    max_new_tokens: int  # of the original request

    def __post_init__(self) -> None:
        if not 0 < self.prompt_tokens <= len(self.token_ids):
            raise ResumeError(
                f"{self.request_id}: prompt_tokens {self.prompt_tokens} outside [1, {len(self.token_ids)}]"
            )
        if len(self.slots) > len(self.token_ids):
            raise ResumeError(f"{self.request_id}: {len(self.slots)} slots for {len(self.token_ids)} tokens")


@dataclasses.dataclass(frozen=True)
class Readmission:
    """What to send sglang again: the tokens so far as the prompt and the remaining token budget."""

    request_id: str
    input_ids: list[int]
    max_new_tokens: int
    cached_tokens: int  # prefix the radix cache holds; sglang recomputes input_ids[cached_tokens:]


def from_ledger(ledger: pb.RequestLedger) -> RestoredRequest | None:
    """The restorable part of a request's sidecar ledger (DescribeRequest), or None. Pure.

    The restored prefix is the run of chunks 0, 1, ... whose KV is valid on every rank, cut to the
    recorded tokens; the chunks after the first invalid one are recomputed. None when the ledger lacks
    what a re-admission needs (no prompt length or token budget recorded). Raises ResumeError for an
    inconsistent ledger.
    """
    if ledger.prompt_tokens == 0 or ledger.max_new_tokens == 0 or not ledger.token_ids:
        return None
    slots: list[int] = []
    for expected, chunk in enumerate(sorted(ledger.chunks, key=lambda c: c.chunk_index)):
        if chunk.chunk_index != expected or not chunk.kv_valid:
            break
        if len(chunk.slots) != ledger.chunk_tokens:
            raise ResumeError(
                f"{ledger.request_id}: chunk {expected} has {len(chunk.slots)} slots, "
                f"chunks have {ledger.chunk_tokens}"
            )
        slots += chunk.slots
    return RestoredRequest(
        request_id=ledger.request_id,
        token_ids=tuple(ledger.token_ids),
        prompt_tokens=ledger.prompt_tokens,
        slots=tuple(slots[: len(ledger.token_ids)]),
        max_new_tokens=ledger.max_new_tokens,
    )


def read_restored(client: client_mod.SidecarClient, group: str) -> list[RestoredRequest]:
    """Every request of `group` in the sidecar's ledger that can be restored (DescribeGroup for the ids,
    DescribeRequest for each), in request-id order. Mutates nothing.

    A request released between the two calls is skipped. Raises grpc.RpcError (sidecar unreachable,
    group unknown) and ResumeError (inconsistent ledger).
    """
    desc = client.describe_group(group=group)
    out = []
    for state in desc.requests:
        try:
            ledger = client.describe_request(group=group, request_id=state.request_id)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                continue
            raise
        record = from_ledger(ledger)
        if record is None:
            log.warning(
                "request %s cannot be resumed: no prompt length or token budget recorded", state.request_id
            )
        else:
            out.append(record)
    return out


def restore_all(tree_cache: Any, allocator: Any, records: Sequence[RestoredRequest]) -> list[Readmission]:
    """Insert every record's restored prefix (`plan` + `insert`); returns the re-admissions to send.

    Records that already generated their budget are skipped. Raises ResumeError from `insert`.
    """
    page_size = int(allocator.page_size)
    out = []
    for record in records:
        readmission = plan(record, page_size=page_size)
        if readmission is not None:
            insert(tree_cache, allocator, record, readmission)
            out.append(readmission)
    return out


def plan(restored: RestoredRequest, *, page_size: int) -> Readmission | None:
    """The re-admission of a restored request, or None when it already generated its budget. Pure.

    The cached prefix is the restored slots cut to whole pages and to at most len(tokens) - 1, since
    sglang must run at least the last token through the model to get the next token's logits.
    """
    generated = len(restored.token_ids) - restored.prompt_tokens
    remaining = restored.max_new_tokens - generated
    if remaining <= 0:
        return None
    usable = min(len(restored.slots), len(restored.token_ids) - 1)
    cached = usable // page_size * page_size
    return Readmission(restored.request_id, list(restored.token_ids), remaining, cached)


def claim_slots(allocator: Any, slots: Sequence[int]) -> None:
    """Take the pages holding `slots` out of sglang's token-to-KV allocator's free list.

    Works on PagedTokenToKVPoolAllocator and TokenToKVPoolAllocator (page size 1). Raises ResumeError,
    changing nothing, when a slot is out of range, its page is already in use, or a page is claimed
    only partly (restored slots always cover whole pages).
    """
    if not slots:
        return
    page_size = int(allocator.page_size)
    slot_tensor = torch.tensor(list(slots), dtype=torch.int64)
    limit = int(allocator.size) + page_size
    bad = (slot_tensor < page_size) | (slot_tensor >= limit)
    if bool(bad.any()):
        first = int(slot_tensor[bad][0])
        raise ResumeError(f"slot {first} is outside the allocatable range [{page_size}, {limit})")
    pages, counts = torch.unique(slot_tensor // page_size, return_counts=True)
    if bool((counts != page_size).any()):
        raise ResumeError("restored slots must cover whole pages of the allocator")
    allocator.merge_and_sort_free()
    free = allocator.free_pages.to("cpu")
    taken = torch.isin(pages, free, invert=True)
    if bool(taken.any()):
        raise ResumeError(f"page {int(pages[taken][0])} of the restored slots is already in use")
    keep = torch.isin(free, pages, invert=True)
    allocator.free_pages = allocator.free_pages[keep.to(allocator.free_pages.device)]


def insert(tree_cache: Any, allocator: Any, restored: RestoredRequest, readmission: Readmission) -> int:
    """Claim the cached prefix's slots and insert it into the radix cache; returns the inserted length.

    A prefix the tree already held (another request's identical prompt) keeps the tree's slots, and the
    duplicates are given back to the allocator, as sglang does when it caches a finished request.
    Mutates the allocator's free list and the tree. Raises ResumeError from `claim_slots`.
    """
    n = readmission.cached_tokens
    if n == 0:
        return 0
    slots = list(restored.slots[:n])
    claim_slots(allocator, slots)
    key = radix_cache.RadixKey(array.array("q", restored.token_ids[:n]))
    value = torch.tensor(slots, dtype=torch.int64, device=getattr(tree_cache, "device", "cpu"))
    result = tree_cache.insert(base_prefix_cache.InsertParams(key=key, value=value))
    if result.prefix_len:
        allocator.free(value[: result.prefix_len])
    return n


def generate_request(readmission: Readmission, sampling_params: dict[str, Any] | None = None) -> Any:
    """sglang's GenerateReqInput that re-admits the request (same rid, tokens so far, reduced budget)."""
    params = dict(sampling_params or {})
    params["max_new_tokens"] = readmission.max_new_tokens
    return io_struct.GenerateReqInput(
        rid=readmission.request_id, input_ids=list(readmission.input_ids), sampling_params=params
    )
