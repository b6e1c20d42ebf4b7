"""Which chunks of which requests just became complete (pure bookkeeping, no sglang, no I/O).

The capture hook feeds, per request and forward pass, where the newly written tokens start and the
pool slots they went to (from the batch's `out_cache_loc`). A chunk c (tokens [c*T, (c+1)*T)) is
ready once its KV is written *and* its token ids are known on the CPU: under sglang's overlap
scheduler the id of the token just decoded reaches `output_ids` one step after its KV is written,
so a chunk can become ready one pass late, never early.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One complete chunk to commit: index, its T slots and T token ids in token order."""

    request_id: str
    index: int
    slots: tuple[int, ...]
    token_ids: tuple[int, ...]


@dataclasses.dataclass
class _Request:
    slots: list[int] = dataclasses.field(default_factory=list)
    committed: int = 0
    # Chunks below `floor` are never handed out: a resumed request's ledger already holds them, at the
    # slots they were restored to (pinned), which may differ from where this run recomputed part of them.
    floor: int = 0


class ChunkTracker:
    """Per-request slot lists and committed-chunk counts of one rank.

    Not thread-safe (one per scheduler process, called from its event loop).
    """

    def __init__(self, chunk_tokens: int) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self._requests: dict[str, _Request] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def written(self, request_id: str) -> int:
        """Tokens whose KV slot is known for `request_id` (0 when untracked)."""
        state = self._requests.get(request_id)
        return len(state.slots) if state else 0

    def committed(self, request_id: str) -> int:
        """Chunks already handed out by `ready` for `request_id`."""
        state = self._requests.get(request_id)
        return state.committed if state else 0

    def seed(self, request_id: str, *, floor: int) -> None:
        """Start tracking a resumed request whose chunks [0, floor) the sidecar's ledger already holds.

        Raises ValueError when the request is already tracked or `floor` is negative."""
        if floor < 0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        if request_id in self._requests:
            raise ValueError(f"{request_id!r} is already tracked")
        self._requests[request_id] = _Request(committed=floor, floor=floor)

    def observe(
        self,
        request_id: str,
        *,
        start: int,
        new_slots: Sequence[int],
        prefix_slots: Callable[[int, int], Sequence[int]],
    ) -> None:
        """Record that tokens [start, start+len(new_slots)) of the request were written at `new_slots`.

        Tokens before `start` that this tracker never saw (a prefix sglang matched in its radix cache,
        or a request first seen mid-way) are read through `prefix_slots(begin, end)`, which must return
        the slots of tokens [begin, end). A `start` below what was seen means the request's KV was
        re-laid (retraction and re-prefill): slots past `start` are replaced and chunks that covered
        them count as uncommitted again. Mutates only this request's entry. Raises ValueError for a
        negative start or a prefix reader returning the wrong number of slots.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        state = self._requests.setdefault(request_id, _Request())
        if start > len(state.slots):
            missing = list(prefix_slots(len(state.slots), start))
            if len(missing) != start - len(state.slots):
                raise ValueError(
                    f"prefix_slots({len(state.slots)}, {start}) returned {len(missing)} slots "
                    f"for {request_id!r}"
                )
            state.slots.extend(int(s) for s in missing)
        elif start < len(state.slots):
            del state.slots[start:]
            state.committed = max(state.floor, min(state.committed, start // self.chunk_tokens))
        state.slots.extend(int(s) for s in new_slots)

    def ready(self, request_id: str, token_ids: Sequence[int]) -> list[Chunk]:
        """Chunks complete now and not handed out before; marks them committed.

        `token_ids` are the request's token ids known on the CPU (prompt + generated so far).
        """
        state = self._requests.get(request_id)
        if state is None:
            return []
        t = self.chunk_tokens
        complete = min(len(state.slots), len(token_ids)) // t
        out = [
            Chunk(
                request_id,
                c,
                tuple(state.slots[c * t : (c + 1) * t]),
                tuple(int(x) for x in token_ids[c * t : (c + 1) * t]),
            )
            for c in range(state.committed, complete)
        ]
        state.committed = max(state.committed, complete)
        return out

    def forget(self, request_id: str) -> bool:
        """Drop a finished or retracted request. Returns whether it was tracked."""
        return self._requests.pop(request_id, None) is not None
