"""What an engine gives GhostServe (the EngineAdapter protocol) and the sidecar glue engines share.

Everything here is free of torch: the SGLang plugin and the reference engine both import it, and the
glue only needs grpc and the generated protos.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
import numpy as np
from ghostserve.kernels import layout as layout_mod
from ghostserve.kernels import protection as protection_mod
from ghostserve.sidecar import client as client_mod
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.wire import layout as wire_layout
from ghostserve.wire import protection as wire_protection

log = logging.getLogger(__name__)

# How a group's KV is protected: defined once in ghostserve.kernels.protection (code, M, T).
Protection = protection_mod.Protection


class AdapterError(RuntimeError):
    """The sidecar refused the engine's request (bad layout, mismatched protection, unknown group)."""


class PoolChangedError(AdapterError):
    """After a sidecar restart the rank's pool is a different segment: its KV is gone (treat as a device
    fault of this rank)."""


class EngineAdapter(Protocol):
    """What an engine exposes so GhostServe can protect and restore its KV cache.

    One adapter lives in every tensor-parallel rank. The engine calls ``allocate_pool`` once at start,
    ``on_chunk_complete`` from its forward loop, and GhostServe calls ``resume`` after a recovery.
    """

    def layout(self) -> layout_mod.KVLayout:
        """The KV layout of this rank's pool: layers, KV heads on this rank, head dim, dtype, page size,
        slots. Identical on every rank of the group. Mutates nothing."""
        ...

    def allocate_pool(self) -> tuple[np.ndarray, bool]:
        """Attach to the sidecar and map this rank's pool, which the sidecar creates or keeps.

        Returns (pool as a writable uint8 array, needs_rebuild): the pool is the engine's KV memory from
        now on; needs_rebuild is True after a device fault, until GhostServe rebuilt and recomputed it.
        Raises AdapterError when the sidecar refuses the layout or protection.
        """
        ...

    def on_chunk_complete(
        self, request_id: str, chunk_index: int, slots: Sequence[int], token_ids: Sequence[int]
    ) -> None:
        """Called after the forward pass that wrote the last token of chunk ``chunk_index`` (tokens
        [c*T, (c+1)*T)) of ``request_id``: prefill chunks and every T decode tokens. ``slots`` are the
        chunk's pool slots in token order (identical on every rank), ``token_ids`` its T tokens.
        Returns at once; encoding happens in the sidecar. Never raises for an unreachable sidecar
        (the chunk stays unprotected and is counted)."""
        ...

    def resume(
        self, request_id: str, tokens: Sequence[int], *, prompt_tokens: int, slots: Sequence[int]
    ) -> None:
        """Re-admit a request whose KV for positions [0, len(tokens)-1) is in place at ``slots``
        (restored by rebuild and recompute); decoding continues from ``tokens[-1]``. Mutates the
        engine's scheduler state only."""
        ...


class Sent(enum.Enum):
    """What became of one chunk's commit."""

    YES = "committed"
    UNPROTECTED = "committed without parity"  # RESOURCE_EXHAUSTED: the parity budget is full
    UNREACHABLE = "not committed"  # the sidecar is down, slow or restarting: worth sending again


@dataclasses.dataclass(frozen=True)
class ChunkCommit:
    """One written chunk as an engine reports it (EngineAdapter.on_chunk_complete's arguments)."""

    request_id: str
    chunk_index: int
    slots: Sequence[int]
    token_ids: Sequence[int]


@dataclasses.dataclass
class AttachResult:
    pool: pb.PoolHandle
    created: bool
    needs_rebuild: bool


class SidecarSession:
    """One rank's link to its sidecar: attach, commit chunks, record tokens, release requests.

    Keeps counters of commits that did not reach the sidecar (those chunks stay unprotected; serving
    goes on). Not thread-safe: one per rank.
    """

    def __init__(
        self,
        client: client_mod.SidecarClient,
        group: str,
        *,
        rank: int,
        world_size: int,
        layout: layout_mod.KVLayout,
        protection: Protection,
        worker_id: str = "",
        reconnect: Callable[[], client_mod.SidecarClient] | None = None,
        device_uuid: str = "",
        parity_budget_bytes: int = 0,
    ) -> None:
        self.client = client
        self.device_uuid = device_uuid  # the rank's GPU (AttachRequest.device_uuid); "" on CPU
        # The group's parity budget (AttachRequest.parity_budget_bytes); 0 = the sidecar's global one.
        self.parity_budget_bytes = parity_budget_bytes
        # After UNAVAILABLE the session swaps in a client from ``reconnect``: a fresh channel dials at
        # once, where the old one would wait out gRPC's reconnect backoff (seconds) after a restart.
        self._reconnect = reconnect
        self._owned = False
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.layout = layout
        self.protection = protection
        self.worker_id = worker_id
        self.commits_sent = 0
        self.commits_failed = 0
        self.commits_unprotected = 0  # accepted but not protected (parity budget full)
        self.reattaches = 0
        self._batches = True  # False once the sidecar answered UNIMPLEMENTED to CommitChunks
        self.pool: pb.PoolHandle | None = None

    def attach(self) -> AttachResult:
        """Attach this rank (creates the group on first attach). Raises AdapterError on refusal."""
        try:
            reply = self._attach_call()
        except grpc.RpcError as exc:
            raise AdapterError(
                f"attach of rank {self.rank} to {self.group!r} refused: {exc.details()}"
            ) from exc
        self.pool = reply.pool
        return AttachResult(reply.pool, reply.created, reply.needs_rebuild)

    def _attach_call(self) -> pb.AttachResponse:
        return self.client.attach(
            group=self.group,
            rank=self.rank,
            world_size=self.world_size,
            layout=wire_layout.layout_to(self.layout),
            protection=wire_protection.protection_to(self.protection),
            worker_id=self.worker_id,
            device_uuid=self.device_uuid,
            parity_budget_bytes=self.parity_budget_bytes,
        )

    def _reattach(self) -> None:
        """Attach again after the sidecar restarted (it re-adopts pools but forgets workers).

        Raises PoolChangedError when the pool is no longer the segment this rank maps."""
        before = self.pool
        reply = self._attach_call()  # grpc.RpcError propagates: the caller decides if it is transient
        self.reattaches += 1
        self.pool = reply.pool
        if before is not None and (reply.pool.shm_name, reply.pool.generation) != (
            before.shm_name,
            before.generation,
        ):
            raise PoolChangedError(
                f"rank {self.rank} of {self.group!r}: pool {before.shm_name} gen {before.generation} became "
                f"{reply.pool.shm_name} gen {reply.pool.generation}"
            )

    def commit(
        self, request_id: str, chunk_index: int, slots: Sequence[int], token_ids: Sequence[int]
    ) -> bool:
        """Report one written chunk. Returns False (and counts it) when the sidecar is unreachable or
        holds no parity for it. Raises AdapterError when the sidecar rejects the commit (a bug in the
        engine's bookkeeping), PoolChangedError when a re-attached pool is not the mapped one."""
        (outcome,) = self.commit_many([ChunkCommit(request_id, chunk_index, slots, token_ids)])
        if isinstance(outcome, AdapterError):
            raise outcome
        return outcome is Sent.YES

    def commit_many(self, commits: Sequence[ChunkCommit]) -> list[Sent | AdapterError]:
        """Report written chunks in one CommitChunks call; per chunk a `Sent` (counted; serving goes on
        whatever it is) or the AdapterError the sidecar's rejection of that chunk means (the caller
        decides per request).

        A sidecar that restarted forgets attached workers (FAILED_PRECONDITION): the session attaches
        again and sends once more. Against a sidecar that predates CommitChunks (UNIMPLEMENTED, a
        rolling upgrade) it commits one chunk per call from then on. Raises PoolChangedError when the
        re-attached pool is not the mapped one.
        """
        if not commits:
            return []
        if not self._batches:
            return [self._commit_one(c) for c in commits]
        msg = pb.CommitChunksRequest(
            group=self.group,
            rank=self.rank,
            chunks=[
                pb.ChunkCommit(
                    request_id=c.request_id,
                    chunk_index=c.chunk_index,
                    slots=list(c.slots),
                    token_ids=list(c.token_ids),
                )
                for c in commits
            ],
        )
        try:
            reply: pb.CommitChunksResponse = self._call("commit_chunks", msg)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._batches = False
                return [self._commit_one(c) for c in commits]
            return [self._outcome(c, exc.code(), exc.details() or "") for c in commits]
        return [
            self._outcome(c, _STATUS.get(r.code, grpc.StatusCode.UNKNOWN), r.message)
            for c, r in zip(commits, reply.results, strict=True)
        ]

    def _commit_one(self, c: ChunkCommit) -> Sent | AdapterError:
        msg = pb.CommitChunkRequest(
            group=self.group,
            rank=self.rank,
            request_id=c.request_id,
            chunk_index=c.chunk_index,
            slots=list(c.slots),
            token_ids=list(c.token_ids),
        )
        try:
            self._call("commit_chunk", msg)
        except grpc.RpcError as exc:
            return self._outcome(c, exc.code(), exc.details() or "")
        return self._outcome(c, grpc.StatusCode.OK, "")

    def _call(self, method: str, msg: Any) -> Any:
        """`self.client.<method>(msg)` with what a restarted sidecar needs: after UNAVAILABLE once more
        on a fresh channel (the old one fails fast until gRPC's reconnect backoff ends, though the
        sidecar may be back), after FAILED_PRECONDITION (the sidecar forgot this worker) once more
        after a re-attach. Raises grpc.RpcError, PoolChangedError."""
        try:
            return self._with_reattach(method, msg)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or self._reconnect is None:
                raise
            self._fresh_channel(exc)
        return self._with_reattach(method, msg)

    def _with_reattach(self, method: str, msg: Any) -> Any:
        try:
            return getattr(self.client, method)(msg)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
        self._reattach()
        return getattr(self.client, method)(msg)

    def _outcome(self, c: ChunkCommit, code: grpc.StatusCode, details: str) -> Sent | AdapterError:
        if code == grpc.StatusCode.OK:
            self.commits_sent += 1
            return Sent.YES
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # The sidecar recorded the chunk as committed but holds no parity for it (budget full,
            # nothing evictable): serving goes on, the chunk is recomputed after a device fault.
            self.commits_unprotected += 1
            return Sent.UNPROTECTED
        if code in _TRANSIENT:
            self.commits_failed += 1
            log.warning("chunk %d of %s not committed: %s", c.chunk_index, c.request_id, code)
            return Sent.UNREACHABLE
        return AdapterError(f"commit of chunk {c.chunk_index} of {c.request_id!r} rejected: {details}")

    def record_tokens(
        self, request_id: str, tokens: Sequence[int], *, prompt_tokens: int, max_new_tokens: int = 0
    ) -> bool:
        """Record a request's tokens so far (and its token budget, 0 = unknown) for resume.
        Returns False when the sidecar is unreachable or its budget is full."""
        sent = self.try_record_tokens(
            request_id, tokens, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens
        )
        return sent is Sent.YES

    def try_record_tokens(
        self, request_id: str, tokens: Sequence[int], *, prompt_tokens: int, max_new_tokens: int = 0
    ) -> Sent:
        """`record_tokens`, telling an unreachable sidecar (UNREACHABLE: worth sending again) from a full
        budget (UNPROTECTED: the request is not resumable, serving goes on). Raises AdapterError."""
        try:
            self.client.record_tokens(
                group=self.group,
                request_id=request_id,
                token_ids=list(tokens),
                prompt_tokens=prompt_tokens,
                max_new_tokens=max_new_tokens,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return Sent.UNPROTECTED
            if _transient(exc):
                self._fresh_channel(exc)
                return Sent.UNREACHABLE
            raise AdapterError(f"record_tokens of {request_id!r} rejected: {exc.details()}") from exc
        return Sent.YES

    def release(self, request_id: str) -> int:
        """Free a finished request's parity and ledger entry; returns bytes freed (0: unknown/unreachable)."""
        return self.try_release(request_id) or 0

    def try_release(self, request_id: str) -> int | None:
        """`release`, telling an unreachable sidecar (None: worth sending again) from an unknown
        request (0)."""
        try:
            return int(self.client.release_request(group=self.group, request_id=request_id).freed_bytes)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            if _transient(exc):
                self._fresh_channel(exc)
                return None
            raise AdapterError(f"release of {request_id!r} rejected: {exc.details()}") from exc

    def detach(self) -> None:
        """Leave the group; the sidecar keeps the pool. Raises grpc.RpcError."""
        self.client.detach(group=self.group, rank=self.rank)

    def _fresh_channel(self, exc: grpc.RpcError) -> None:
        if self._reconnect is not None and exc.code() == grpc.StatusCode.UNAVAILABLE:
            if self._owned:  # the caller's own client may be shared: only close ours
                self.client.close()
            self.client, self._owned = self._reconnect(), True


# The sidecar restarting (UNAVAILABLE), slow (DEADLINE_EXCEEDED) or not knowing the group yet after its
# own restart (FAILED_PRECONDITION/NOT_FOUND): serving continues unprotected.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
)
# CommitChunks reports each chunk's status as its number.
_STATUS = {code.value[0]: code for code in grpc.StatusCode}


def _transient(exc: grpc.RpcError) -> bool:
    return exc.code() in _TRANSIENT
