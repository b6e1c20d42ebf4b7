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
from sglang.srt.mem_cache import base_prefix_cache, radix_cache, unified_radix_cache

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """The restored request cannot be placed: slots in use, out of range, or inconsistent lengths."""


@dataclasses.dataclass(frozen=True)
class RestoredRequest:
    """One request whose KV for tokens [0, len(slots)) is in place in every rank's pool."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt + generated so far
    prompt_tokens: int  # 0: not recorded (rank 0's RecordTokens had not arrived)
    slots: tuple[int, ...]  # pool slot of each restored token, in token order
    max_new_tokens: int  # of the original request; 0: not recorded

    def __post_init__(self) -> None:
        if not 0 <= self.prompt_tokens <= len(self.token_ids):
            raise ResumeError(
                f"{self.request_id}: prompt_tokens {self.prompt_tokens} outside [0, {len(self.token_ids)}]"
            )
        if len(self.slots) > len(self.token_ids):
            raise ResumeError(f"{self.request_id}: {len(self.slots)} slots for {len(self.token_ids)} tokens")


@dataclasses.dataclass(frozen=True)
class Readmission:
    """What to send sglang again: the tokens so far as the prompt and the remaining token budget."""

    request_id: str
    input_ids: list[int]
    max_new_tokens: int  # 0: not known (the client's resubmission carries its own budget)
    cached_tokens: int  # prefix the radix cache holds; sglang recomputes input_ids[cached_tokens:]


def from_ledger(ledger: pb.RequestLedger) -> RestoredRequest | None:
    """The restorable part of a request's sidecar ledger (DescribeRequest), or None. Pure.

    The restored prefix is the run of chunks 0, 1, ... whose KV is valid on every rank, cut to the
    recorded tokens; the chunks after the first invalid one are recomputed. None when the ledger has
    no tokens. Raises ResumeError for an
    inconsistent ledger.
    """
    if not ledger.token_ids:
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


def read_restored(client: client_mod.SidecarClient, group: str) -> tuple[list[RestoredRequest], list[str]]:
    """The requests of `group` in the sidecar's ledger that can be restored (DescribeGroup for the ids,
    DescribeRequest for each), in request-id order, and the ids of those that cannot (no prompt
    length or token budget recorded, or an inconsistent ledger): their entries are of no use.

    A request released between the two calls is skipped. Mutates nothing. Raises grpc.RpcError
    (sidecar unreachable, group unknown).
    """
    desc = client.describe_group(group=group)
    out, dropped = [], []
    for state in desc.requests:
        try:
            ledger = client.describe_request(group=group, request_id=state.request_id)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                continue
            raise
        try:
            record = from_ledger(ledger)
        except ResumeError as exc:
            log.warning("request %s cannot be resumed: %s", state.request_id, exc)
            record = None
        else:
            if record is None:
                log.warning("request %s cannot be resumed: no tokens recorded", state.request_id)
        if record is None:
            dropped.append(state.request_id)
        else:
            out.append(record)
    return out, dropped


@dataclasses.dataclass
class Pin:
    """A restored prefix held in sglang's radix cache until its request is resumed and released.

    `lock` is the tree lock on the prefix's last node (not evictable while held); `held` are restored
    slots the tree did not take (its own copy of an identical prefix won) which stay claimed so that
    the ledger's slots never hold another request's KV.
    """

    record: RestoredRequest
    readmission: Readmission
    lock: Any
    held: list[int]
    inserted: int


def restore_all(tree_cache: Any, allocator: Any, records: Sequence[RestoredRequest]) -> list[Pin]:
    """Insert and pin every record's restored prefix (`plan` + `insert`); returns the pins.

    Records that already generated their budget are skipped. A record whose slots cannot be claimed
    (ResumeError) is skipped and logged, so that one bad ledger entry never stops the server starting.
    """
    page_size = int(allocator.page_size)
    out = []
    for record in records:
        readmission = plan(record, page_size=page_size)
        if readmission is None:
            continue
        try:
            out.append(insert(tree_cache, allocator, record, readmission))
        except ResumeError as exc:
            log.error("request %s is not restored: %s", record.request_id, exc)
    return out


def release_pin(tree_cache: Any, allocator: Any, pin: Pin) -> None:
    """Unlock a pinned prefix (it becomes ordinary, evictable cache) and free the slots it held."""
    if pin.lock is not None:
        tree_cache.unlock(pin.lock)
        pin.lock = None
    if pin.held:
        allocator.free(torch.tensor(pin.held, dtype=torch.int64, device=allocator.device))
        pin.held = []


def plan(restored: RestoredRequest, *, page_size: int) -> Readmission | None:
    """The re-admission of a restored request, or None when it already generated its budget. Pure.

    The cached prefix is the restored slots cut to whole pages and to at most len(tokens) - 1, since
    sglang must run at least the last token through the model to get the next token's logits.
    """
    remaining = 0  # not known: the client's resubmission carries its own budget
    if restored.prompt_tokens and restored.max_new_tokens:
        remaining = restored.max_new_tokens - (len(restored.token_ids) - restored.prompt_tokens)
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


def insert(tree_cache: Any, allocator: Any, restored: RestoredRequest, readmission: Readmission) -> Pin:
    """Claim every restored slot, insert the restored prefix into the radix cache and lock it.

    All restored chunks are inserted (not only what the resubmission will match): the ledger keeps
    pointing at their slots, so none of them may be handed to another request while the ledger holds
    the request. A prefix the tree already held (another restored request with an identical prefix)
    keeps the tree's slots; ours stay claimed in `Pin.held`. Mutates the allocator's free list and
    the tree. Raises ResumeError from `claim_slots`, changing nothing.
    """
    n = len(restored.slots) // int(allocator.page_size) * int(allocator.page_size)
    if n == 0:
        return Pin(restored, readmission, None, [], 0)
    slots = list(restored.slots[:n])
    claim_slots(allocator, slots)
    key = radix_cache.RadixKey(array.array("q", restored.token_ids[:n]))
    value = torch.tensor(slots, dtype=torch.int64, device=getattr(tree_cache, "device", "cpu"))
    result = tree_cache.insert(base_prefix_cache.InsertParams(key=key, value=value))
    held: list[int] = []
    if result.prefix_len:
        held = slots[: result.prefix_len]
        if isinstance(tree_cache, unified_radix_cache.UnifiedRadixCache):
            claim_slots(allocator, held)  # the unified tree freed the duplicates itself: take them back
    node = result.last_device_node
    if node is None:
        node = tree_cache.match_prefix(base_prefix_cache.MatchPrefixParams(key=key)).last_device_node
    return Pin(restored, readmission, tree_cache.lock(node), held, n)


def generate_request(readmission: Readmission, sampling_params: dict[str, Any] | None = None) -> Any:
    """sglang's GenerateReqInput that re-admits the request (same rid, tokens so far, reduced budget)."""
    params = dict(sampling_params or {})
    if readmission.max_new_tokens:
        params["max_new_tokens"] = readmission.max_new_tokens
    return io_struct.GenerateReqInput(
        rid=readmission.request_id, input_ids=list(readmission.input_ids), sampling_params=params
    )
