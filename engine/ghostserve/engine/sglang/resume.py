"""Resume after a rebuild: put restored KV back into sglang's radix cache and plan the re-admission.

After a rebuild every rank's pool (in sidecar custody) again holds each request's KV at the slots
recorded when its chunks were committed. A restarted scheduler has an empty allocator and tree, so on
every rank: the slots are taken out of the allocator's free list, the token prefix is inserted into
the radix cache with those slots as values, and the request is re-admitted as prompt + generated
tokens with max_new_tokens reduced by what was generated. sglang then matches the restored prefix and
recomputes only the tokens after it (the last partial page and the unprotected tail).
"""

from __future__ import annotations

import array
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.managers import io_struct
from sglang.srt.mem_cache import base_prefix_cache, radix_cache


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


def load_records(path: str) -> list[RestoredRequest]:
    """Read restored requests from a JSON file: a list of objects with the fields of RestoredRequest.

    Raises ResumeError naming the file and the first bad entry; mutates nothing.
    """
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot read restored requests from {path}: {exc}") from exc
    if not isinstance(items, list):
        raise ResumeError(f"{path}: expected a JSON list of restored requests")
    records = []
    for i, item in enumerate(items):
        try:
            records.append(
                RestoredRequest(
                    request_id=str(item["request_id"]),
                    token_ids=tuple(int(x) for x in item["token_ids"]),
                    prompt_tokens=int(item["prompt_tokens"]),
                    slots=tuple(int(x) for x in item["slots"]),
                    max_new_tokens=int(item["max_new_tokens"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ResumeError(f"{path}: entry {i} is not a restored request: {exc!r}") from exc
    return records


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
