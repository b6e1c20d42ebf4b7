"""The request ledger of one group (pure, no I/O): requests, the slots and token ids of every chunk,
which ranks committed it, its protection state and the checksums of its data shards.

A chunk is complete once every rank of the group committed it with the same slots; only then is it
encoded. The ledger never touches pools or parity; `ghostserve.sidecar.core` drives it.
"""

from __future__ import annotations

import dataclasses
import enum
import re

import numpy as np
import numpy.typing as npt
from ghostserve.sidecar import errors

REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,256}$")
MAX_TOKENS = 1 << 32


class State(enum.IntEnum):
    """Values equal ghostserve.v1.ChunkState."""

    WAITING_FOR_RANKS = 1
    QUEUED = 2
    PROTECTED = 3
    UNPROTECTED = 4


class Failure(enum.IntEnum):
    """Why a chunk is not protected; values equal ghostserve.v1.ChunkFailure."""

    NONE = 0
    NOT_PROTECTED = 1
    EVICTED = 2
    CHECKSUM_MISMATCH = 3
    TOO_MANY_LOSSES = 4


@dataclasses.dataclass(eq=False)
class Chunk:
    """One chunk of one request. `version` changes whenever the record is replaced, so an encode that
    finishes after a release/drop can tell that its result is no longer wanted."""

    index: int
    slots: npt.NDArray[np.int64]
    token_ids: npt.NDArray[np.int64]
    committed: set[int]
    state: State = State.WAITING_FOR_RANKS
    failure: Failure = Failure.NONE
    checksums: tuple[int, ...] = ()
    parity_bytes: int = 0
    # Set by MarkLost on complete chunks (a rank's copy of their KV is gone), cleared by a rebuild.
    kv_lost: bool = False


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    chunks: dict[int, Chunk] = dataclasses.field(default_factory=dict)
    tokens: npt.NDArray[np.int64] = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    prompt_tokens: int = 0
    max_new_tokens: int = 0  # 0 = not known

    def complete_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks.values() if c.state != State.WAITING_FOR_RANKS]

    def committed_chunks(self) -> int:
        """Length of the prefix of chunks every rank committed (what the planner calls total_chunks)."""
        n = 0
        while n in self.chunks and self.chunks[n].state != State.WAITING_FOR_RANKS:
            n += 1
        return n

    def protected_count(self) -> int:
        return sum(1 for c in self.chunks.values() if c.state == State.PROTECTED)

    def parity_bytes(self) -> int:
        return sum(c.parity_bytes for c in self.chunks.values())


def check_request_id(request_id: str) -> None:
    if not REQUEST_ID.match(request_id):
        raise errors.InvalidArgument(
            f"request id must be 1-256 printable non-space ASCII characters, got {request_id[:64]!r}"
        )


class Ledger:
    """Requests of one group of `world_size` ranks with chunks of `chunk_tokens` tokens."""

    def __init__(self, *, world_size: int, chunk_tokens: int, pool_slots: int) -> None:
        self.world_size = world_size
        self.chunk_tokens = chunk_tokens
        self.pool_slots = pool_slots
        self.requests: dict[str, Request] = {}

    def _check_slots(self, slots: npt.NDArray[np.int64]) -> None:
        if slots.size != self.chunk_tokens:
            raise errors.InvalidArgument(f"a chunk has {self.chunk_tokens} slots, got {slots.size}")
        if not slots.size:
            return
        # One sort answers range and repeats (np.unique costs 4x as much: it is on every commit's path).
        ordered = np.sort(slots)
        if int(ordered[0]) < 0 or int(ordered[-1]) >= self.pool_slots:
            bad = int(slots[(slots < 0) | (slots >= self.pool_slots)][0])
            raise errors.InvalidArgument(f"slot {bad} out of range [0, {self.pool_slots})")
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise errors.InvalidArgument("slots of a chunk repeat")

    def commit(
        self,
        rank: int,
        request_id: str,
        chunk_index: int,
        *,
        slots: npt.NDArray[np.int64],
        token_ids: npt.NDArray[np.int64],
    ) -> tuple[Chunk, bool]:
        """Record that `rank` wrote `chunk_index` of `request_id` at `slots`.

        Returns (chunk, completed_now): completed_now is True for the commit that made every rank agree.
        A repeated commit with the same slots is accepted and changes nothing. Raises InvalidArgument
        (bad rank, slots, token ids, or slots/token ids that differ from another rank's) before
        changing anything.
        """
        if not 0 <= rank < self.world_size:
            raise errors.InvalidArgument(f"rank {rank} out of range [0, {self.world_size})")
        check_request_id(request_id)
        if (chunk_index + 1) * self.chunk_tokens > MAX_TOKENS:
            raise errors.InvalidArgument(f"chunk index {chunk_index} is beyond any request length")
        self._check_slots(slots)
        if token_ids.size not in (0, self.chunk_tokens):
            raise errors.InvalidArgument(
                f"token_ids must be empty or {self.chunk_tokens} long, got {token_ids.size}"
            )
        request = self.requests.get(request_id)
        chunk = request.chunks.get(chunk_index) if request else None
        if chunk is not None:
            if not np.array_equal(chunk.slots, slots):
                raise errors.InvalidArgument(
                    f"rank {rank} committed chunk {chunk_index} of {request_id!r} with slots that differ "
                    "from the other ranks'"
                )
            if token_ids.size and chunk.token_ids.size and not np.array_equal(chunk.token_ids, token_ids):
                raise errors.InvalidArgument(
                    f"rank {rank} committed chunk {chunk_index} of {request_id!r} with different token ids"
                )
            if token_ids.size and not chunk.token_ids.size:
                chunk.token_ids = token_ids.copy()
            was_waiting = chunk.state == State.WAITING_FOR_RANKS
            chunk.committed.add(rank)
            done = was_waiting and len(chunk.committed) == self.world_size
            if done:
                chunk.state = State.QUEUED
            return chunk, done
        if request is None:
            request = self.requests[request_id] = Request(request_id)
        chunk = Chunk(chunk_index, slots.copy(), token_ids.copy(), {rank})
        request.chunks[chunk_index] = chunk
        if self.world_size == 1:
            chunk.state = State.QUEUED
            return chunk, True
        return chunk, False

    def record_tokens(
        self,
        request_id: str,
        tokens: npt.NDArray[np.int64],
        *,
        prompt_tokens: int,
        max_new_tokens: int = 0,
    ) -> None:
        """Replace the request's token list (and its token budget, unless 0 = not known).

        Raises InvalidArgument for bad ids or counts, changing nothing."""
        check_request_id(request_id)
        if not 0 <= max_new_tokens <= MAX_TOKENS:
            raise errors.InvalidArgument(f"max_new_tokens {max_new_tokens} out of range")
        if tokens.size > MAX_TOKENS or not 0 <= prompt_tokens <= tokens.size:
            raise errors.InvalidArgument(
                f"prompt_tokens {prompt_tokens} must be within the {tokens.size} tokens recorded"
            )
        request = self.requests.setdefault(request_id, Request(request_id))
        request.tokens = tokens.copy()
        request.prompt_tokens = prompt_tokens
        if max_new_tokens:
            request.max_new_tokens = max_new_tokens

    def get(self, request_id: str) -> Request:
        request = self.requests.get(request_id)
        if request is None:
            raise errors.NotFound(f"unknown request {request_id[:64]!r}")
        return request

    def release(self, request_id: str) -> Request:
        """Remove and return the request. Raises NotFound."""
        request = self.get(request_id)
        del self.requests[request_id]
        return request

    def drop_rank_commits(self, ranks: set[int]) -> None:
        """After a device fault: chunks still waiting forget the lost ranks' commits (that KV is gone);
        complete chunks are marked kv_lost until a rebuild restores them."""
        for request in self.requests.values():
            for chunk in request.chunks.values():
                if chunk.state == State.WAITING_FOR_RANKS:
                    chunk.committed -= ranks
                else:
                    chunk.kv_lost = True

    def tail_tokens(self, request: Request) -> int:
        return max(0, int(request.tokens.size) - request.committed_chunks() * self.chunk_tokens)
