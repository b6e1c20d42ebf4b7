"""What an engine gives GhostServe (the EngineAdapter protocol) and the sidecar glue engines share.

Everything here is free of torch: the SGLang plugin and the reference engine both import it, and the
glue only needs grpc and the generated protos.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

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
        """Report one written chunk. Returns False (and counts it) when the sidecar is unreachable.

        A sidecar that restarted forgets attached workers (FAILED_PRECONDITION): the session attaches
        again and retries once. Raises AdapterError when the sidecar rejects the commit (a bug in the
        engine's bookkeeping), PoolChangedError when the re-attached pool is not the mapped one.
        """
        msg = pb.CommitChunkRequest(
            group=self.group,
            rank=self.rank,
            request_id=request_id,
            chunk_index=chunk_index,
            slots=list(slots),
            token_ids=list(token_ids),
        )
        try:
            try:
                self.client.commit_chunk(msg)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                self._reattach()
                self.client.commit_chunk(msg)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # The sidecar recorded the chunk as committed but holds no parity for it (budget full,
                # nothing evictable): serving goes on, the chunk is recomputed after a device fault.
                self.commits_unprotected += 1
                return False
            if _transient(exc):
                self.commits_failed += 1
                log.warning("chunk %d of %s left unprotected: %s", chunk_index, request_id, exc.code())
                self._fresh_channel(exc)
                return False
            raise AdapterError(
                f"commit of chunk {chunk_index} of {request_id!r} rejected: {exc.details()}"
            ) from exc
        self.commits_sent += 1
        return True

    def record_tokens(
        self, request_id: str, tokens: Sequence[int], *, prompt_tokens: int, max_new_tokens: int = 0
    ) -> bool:
        """Record a request's tokens so far (and its token budget, 0 = unknown) for resume.
        Returns False when the sidecar is unreachable."""
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
                return False  # the sidecar's budget is full: the request is not resumable, serving goes on
            if _transient(exc):
                self._fresh_channel(exc)
                return False
            raise AdapterError(f"record_tokens of {request_id!r} rejected: {exc.details()}") from exc
        return True

    def release(self, request_id: str) -> int:
        """Free a finished request's parity and ledger entry; returns bytes freed (0: unknown/unreachable)."""
        try:
            return int(self.client.release_request(group=self.group, request_id=request_id).freed_bytes)
        except grpc.RpcError as exc:
            if _transient(exc) or exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise AdapterError(f"release of {request_id!r} rejected: {exc.details()}") from exc

    def detach(self) -> None:
        """Leave the group; the sidecar keeps the pool. Raises grpc.RpcError."""
        self.client.detach(group=self.group, rank=self.rank)

    def _fresh_channel(self, exc: grpc.RpcError) -> None:
        if self._reconnect is not None and exc.code() == grpc.StatusCode.UNAVAILABLE:
            if self._owned:  # the caller's own client may be shared: only close ours
                self.client.close()
            self.client, self._owned = self._reconnect(), True


def _transient(exc: grpc.RpcError) -> bool:
    # The sidecar restarting (UNAVAILABLE), slow (DEADLINE_EXCEEDED) or not knowing the group yet after
    # its own restart (FAILED_PRECONDITION/NOT_FOUND): serving continues unprotected.
    return exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    )


@dataclasses.dataclass(frozen=True)
class _Call:
    kind: str  # "commit" | "record" | "release"
    request_id: str
    chunk_index: int = 0
    slots: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0
    max_new_tokens: int = 0


class CommitSender:
    """A rank's sidecar calls (chunk commits, token records, releases) sent in order by one daemon
    thread, so a forward pass never waits on an RPC (EngineAdapter.on_chunk_complete "returns at once").

    Both engines use it. The order is kept per rank: a request's release follows its commits, so once
    every rank's release arrived no late commit can re-create the entry. A rejection (AdapterError) goes
    to `on_rejected(request_id, error)` when given (the engine then serves that request unprotected);
    otherwise `drain` re-raises the first one. Calls still queued when the process is SIGKILLed are
    lost: chunks the sidecar does not list as committed are recomputed after a restart.
    """

    def __init__(
        self,
        session: SidecarSession,
        *,
        on_rejected: Callable[[str, AdapterError], None] | None = None,
        dropped: Callable[[str], bool] = lambda request_id: False,
    ) -> None:
        self.session = session
        self._on_rejected = on_rejected
        # Commits and records of requests for which `dropped` holds are skipped (their releases are not).
        self._dropped = dropped
        self._queue: queue.Queue[_Call] = queue.Queue()
        self._error: AdapterError | None = None
        self.rejected = 0
        self._thread = threading.Thread(target=self._run, name="gs-commits", daemon=True)
        self._thread.start()

    def submit(
        self, request_id: str, chunk_index: int, slots: Sequence[int], token_ids: Sequence[int]
    ) -> None:
        """Queue the commit of one chunk (its T slots and T token ids)."""
        self._queue.put(_Call("commit", request_id, chunk_index, tuple(slots), tuple(token_ids)))

    def record(
        self, request_id: str, tokens: Sequence[int], *, prompt_tokens: int, max_new_tokens: int = 0
    ) -> None:
        """Queue RecordTokens (a request's prompt length and budget for resume; sent once per request)."""
        self._queue.put(
            _Call("record", request_id, token_ids=tuple(tokens), prompt_tokens=prompt_tokens,
                  max_new_tokens=max_new_tokens)
        )

    def release(self, request_id: str) -> None:
        """Queue the release of a finished request (after its commits)."""
        self._queue.put(_Call("release", request_id))

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def drain(self) -> None:
        """Block until every queued call was sent (or failed). Raises the first AdapterError a call met
        when there is no `on_rejected` callback (then clears it)."""
        self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            call = self._queue.get()
            try:
                self._send(call)
            except AdapterError as exc:
                self.rejected += 1
                if self._on_rejected is not None:
                    self._on_rejected(call.request_id, exc)
                elif self._error is None:
                    self._error = exc
            except Exception as exc:  # never let the sender die: every later commit would queue forever
                log.exception("sidecar call %s of %s failed", call.kind, call.request_id)
                error = AdapterError(f"{call.kind} of {call.request_id!r} failed: {exc}")
                self.rejected += 1
                if self._on_rejected is not None:
                    self._on_rejected(call.request_id, error)
                elif self._error is None:
                    self._error = error
            finally:
                self._queue.task_done()

    def _send(self, call: _Call) -> None:
        s = self.session
        if call.kind != "release" and self._dropped(call.request_id):
            return
        if call.kind == "commit":
            s.commit(call.request_id, call.chunk_index, call.slots, call.token_ids)
        elif call.kind == "record":
            s.record_tokens(
                call.request_id, call.token_ids, prompt_tokens=call.prompt_tokens,
                max_new_tokens=call.max_new_tokens,
            )
        else:
            s.release(call.request_id)
