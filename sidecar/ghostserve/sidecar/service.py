"""The gRPC servicer: convert a request, call the custodian (or recovery / health), build the reply.

`rpc` decodes, bounds and authorizes each call before it gets here; every custodian call runs on a
thread of the servicer's pool (`_off`), never on the event loop, so health checks and other groups'
calls never wait behind one group's work. `status_of` is the one place where errors become gRPC status
codes; nothing reaches a client as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from ghostserve.kernels import errors as codec_errors
from ghostserve.sidecar import (
    authz,
    commits,
    convert,
    core,
    devices,
    errors,
    health,
    ledger,
    move,
    move_receive,
    recovery,
)
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.v1 import sidecar_pb2_grpc as pb_grpc

log = logging.getLogger("ghostserve.sidecar")

PIECE_BYTES = 4 * 1024 * 1024 - 64 * 1024  # data per streamed piece: the whole message stays <= 4 MiB
MAX_SLOTS = 1 << 20
MAX_BATCH_CHUNKS = 4096  # chunks in one CommitChunks call (each also bounded by the message size)
MAX_TOKENS = 1 << 24
MAX_WAIT_S = 600.0

R = TypeVar("R")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised while serving a call."""
    if isinstance(exc, errors.SidecarError):
        return getattr(grpc.StatusCode, exc.code), str(exc)
    if isinstance(exc, codec_errors.CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"codec: {exc}"
    if isinstance(exc, (ValueError, OverflowError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _mapped(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unexpected-error", extra={"method": fn.__name__})
            await context.abort(code, message)
            raise  # abort raises; this line only satisfies type checkers

    return wrapper


def _chunk_result(outcome: ledger.State | Exception) -> pb.ChunkCommitResult:
    if isinstance(outcome, Exception):
        code, message = status_of(outcome)
        return pb.ChunkCommitResult(code=code.value[0], message=message)
    return pb.ChunkCommitResult(state=convert.enum_value(outcome))


def _wait(seconds: float) -> float:
    if not math.isfinite(seconds) or seconds < 0:
        raise errors.InvalidArgument(f"timeout_seconds must be a finite number >= 0, got {seconds}")
    return min(seconds, MAX_WAIT_S)


class Servicer(pb_grpc.SidecarServicer):
    def __init__(self, custodian: core.Custodian, hub: health.HealthHub, *, node: str) -> None:
        self.c = custodian
        self.hub = hub
        self.node = node
        # MoveGroup (source side) and ReceiveGroup (target side); the server sets mover.credentials.
        self.mover = move.Mover(custodian)
        self.receiver = move_receive.Receiver(custodian)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc")
        self.streams = 0  # StreamRebuild calls being served (capped: each holds a shard)

    async def _off(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run blocking custodian work on the servicer's threads, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    @_mapped
    async def Attach(self, request: pb.AttachRequest, context: Any) -> pb.AttachResponse:
        settings = convert.settings_from(request)
        self.receiver.check_attachable(request.group)
        res = await self._off(
            self.c.attach,
            request.group,
            request.rank,
            settings,
            worker_id=request.worker_id,
            identity=authz.CALLER.get(authz.Caller(())).name,
            device_uuid=request.device_uuid,
            budget_bytes=request.parity_budget_bytes,
        )
        return pb.AttachResponse(
            pool=convert.pool_to(res.pool), created=res.created, needs_rebuild=res.needs_rebuild
        )

    @_mapped
    async def Detach(self, request: pb.DetachRequest, context: Any) -> pb.DetachResponse:
        await self._off(self.c.detach, request.group, request.rank)
        return pb.DetachResponse()

    @_mapped
    async def CommitChunk(self, request: pb.CommitChunkRequest, context: Any) -> pb.CommitChunkResponse:
        slots = convert.int_array(request.slots, what="slots", limit=MAX_SLOTS)
        tokens = convert.int_array(request.token_ids, what="token_ids", limit=MAX_SLOTS)
        state = await self._off(
            self.c.commit_chunk,
            request.group,
            request.rank,
            request.request_id,
            request.chunk_index,
            slots=slots,
            token_ids=tokens,
        )
        return pb.CommitChunkResponse(state=convert.enum_value(state))

    @_mapped
    async def CommitChunks(self, request: pb.CommitChunksRequest, context: Any) -> pb.CommitChunksResponse:
        if len(request.chunks) > MAX_BATCH_CHUNKS:
            raise errors.InvalidArgument(
                f"chunks: {len(request.chunks)} in one call, at most {MAX_BATCH_CHUNKS} allowed"
            )
        items: list[commits.Commit] = []
        for ch in request.chunks:
            try:
                slots = convert.int_array(ch.slots, what="slots", limit=MAX_SLOTS)
                tokens = convert.int_array(ch.token_ids, what="token_ids", limit=MAX_SLOTS)
            except errors.SidecarError as exc:
                items.append(exc)
                continue
            items.append((ch.request_id, ch.chunk_index, slots, tokens))
        outcomes = await self._off(self.c.commit_chunks, request.group, request.rank, items)
        return pb.CommitChunksResponse(results=[_chunk_result(o) for o in outcomes])

    @_mapped
    async def RecordTokens(self, request: pb.RecordTokensRequest, context: Any) -> pb.RecordTokensResponse:
        tokens = convert.int_array(request.token_ids, what="token_ids", limit=MAX_TOKENS)
        await self._off(
            self.c.record_tokens,
            request.group,
            request.request_id,
            tokens,
            prompt_tokens=request.prompt_tokens,
            max_new_tokens=request.max_new_tokens,
        )
        return pb.RecordTokensResponse()

    @_mapped
    async def ReleaseRequest(
        self, request: pb.ReleaseRequestRequest, context: Any
    ) -> pb.ReleaseRequestResponse:
        freed = await self._off(self.c.release_request, request.group, request.request_id)
        return pb.ReleaseRequestResponse(freed_bytes=freed)

    @_mapped
    async def DescribeGroup(self, request: pb.DescribeGroupRequest, context: Any) -> pb.GroupDescription:
        return await self._off(self._describe_group, request.group)

    def _describe_group(self, name: str) -> pb.GroupDescription:
        with self.c.locked(name) as g:
            return convert.describe(g)

    @_mapped
    async def DescribeRequest(self, request: pb.DescribeRequestRequest, context: Any) -> pb.RequestLedger:
        return await self._off(self._describe_request, request.group, request.request_id)

    def _describe_request(self, name: str, request_id: str) -> pb.RequestLedger:
        with self.c.locked(name) as g:
            g, req = self.c.describe_request(name, request_id)
            valid = [self.c.kv_valid(g, req.chunks[i]) for i in sorted(req.chunks)]
            return convert.request_ledger(g, req, valid=valid)

    @_mapped
    async def ListGroups(self, request: pb.ListGroupsRequest, context: Any) -> pb.ListGroupsResponse:
        caller = authz.CALLER.get(authz.Caller(()))
        with self.c.lock:
            names = [n for n, g in self.c.groups.items() if authz.may_see(caller, g.creator)]
        return pb.ListGroupsResponse(groups=sorted(names))

    @_mapped
    async def DeleteGroup(self, request: pb.DeleteGroupRequest, context: Any) -> pb.DeleteGroupResponse:
        if self.receiver.discard(request.group):  # a move to this node that will not finish
            return pb.DeleteGroupResponse()
        await self._off(self.c.delete_group, request.group)
        return pb.DeleteGroupResponse()

    @_mapped
    async def MarkLost(self, request: pb.MarkLostRequest, context: Any) -> pb.MarkLostResponse:
        await self._off(self.c.mark_lost, request.group, list(request.ranks), reason=request.reason)
        return pb.MarkLostResponse()

    @_mapped
    async def PlanRecovery(self, request: pb.PlanRecoveryRequest, context: Any) -> pb.RecoveryPlan:
        plan = await self._off(
            recovery.plan,
            self.c,
            request.group,
            list(request.lost_ranks),
            prefill_tokens_per_s=request.prefill_tokens_per_s,
            rebuild_bytes_per_s=request.rebuild_bytes_per_s,
        )
        return convert.plan_to(request.group, plan)

    @_mapped
    async def Rebuild(self, request: pb.RebuildRequest, context: Any) -> pb.RebuildReport:
        report = await self._off(
            recovery.rebuild,
            self.c,
            request.group,
            list(request.lost_ranks),
            request_ids=list(request.request_ids),
            first_chunk=dict(request.first_chunk),
        )
        return convert.report_to(request.group, report)

    async def StreamRebuild(
        self, request: pb.StreamRebuildRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RebuiltShardPiece]:
        """One chunk is rebuilt at a time (in a thread) and sent in pieces; each `yield` waits for
        HTTP/2 flow control, so a slow receiver slows the rebuild instead of filling memory. At most
        config.max_rebuild_streams are served at once (each holds up to one shard while it waits)."""
        if self.streams >= self.c.config.max_rebuild_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.streams} rebuild streams are being served already (at most "
                f"{self.c.config.max_rebuild_streams}); retry later",
            )
        self.streams += 1
        try:
            async for piece in self._stream_rebuild(request, context):
                yield piece
        finally:
            self.streams -= 1

    async def _stream_rebuild(
        self, request: pb.StreamRebuildRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RebuiltShardPiece]:
        try:
            pieces = recovery.stream(
                self.c,
                request.group,
                list(request.lost_ranks),
                request.rank,
                request_ids=list(request.request_ids),
                first_chunk=dict(request.first_chunk),
            )
            first = await self._off(next, pieces, None)
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
            return
        try:
            piece = first
            while piece is not None:
                slots = piece.slots.tolist()
                if piece.data is None:
                    yield pb.RebuiltShardPiece(
                        request_id=piece.request_id,
                        chunk_index=piece.chunk_index,
                        rank=request.rank,
                        slots=slots,
                        failure=convert.enum_value(piece.failure),
                    )
                else:
                    data = memoryview(piece.data)
                    for off in range(0, max(len(data), 1), PIECE_BYTES):
                        yield pb.RebuiltShardPiece(
                            request_id=piece.request_id,
                            chunk_index=piece.chunk_index,
                            rank=request.rank,
                            slots=slots if off == 0 else [],
                            offset=off,
                            data=bytes(data[off : off + PIECE_BYTES]),
                            shard_nbytes=len(data),
                        )
                piece = await self._off(next, pieces, None)
        finally:
            # ValueError: still running in its thread after a cancel; it stops at its next yield.
            with contextlib.suppress(ValueError):
                pieces.close()

    async def WatchHealth(
        self, request: pb.WatchHealthRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.HealthEvent]:
        seq = self.hub.position()
        if request.initial_state:
            for event in self.hub.snapshot():
                yield self._event(event)
        while True:
            events, seq = await self.hub.wait_after(seq)
            if not events:
                return
            for event in events:
                yield self._event(event)

    def _event(self, e: health.Event) -> pb.HealthEvent:
        with self.c.lock:
            holder = devices.rank_of(self.c.groups, e.gpu_uuid)
        group, rank = holder if holder is not None else ("", 0)
        return pb.HealthEvent(
            group=group,
            rank=rank,
            gpu_index=e.gpu_index,
            gpu_uuid=e.gpu_uuid,
            kind=convert.enum_value(e.kind),
            xid=e.xid,
            fatal=e.fatal,
            message=e.message,
            time=e.time,
            node=self.node,
        )

    @_mapped
    async def InjectFault(self, request: pb.InjectFaultRequest, context: Any) -> pb.InjectFaultResponse:
        if request.kind not in {int(k) for k in health.Kind}:
            raise errors.InvalidArgument(f"unknown health kind {request.kind}")
        await self.hub.inject(
            request.gpu_index,
            health.Kind(request.kind),
            xid=request.xid,
            message=request.message[:1000],
        )
        return pb.InjectFaultResponse()

    @_mapped
    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.Stats:
        return await self._off(self._stats)

    def _stats(self) -> pb.Stats:
        c = self.c
        with c.lock:
            groups = list(c.groups.values())
        protected = unprotected = requests = pool_bytes = 0
        for g in groups:
            with g.lock:
                for r in g.ledger.requests.values():
                    for ch in r.chunks.values():
                        protected += ch.state == ledger.State.PROTECTED
                        unprotected += ch.state == ledger.State.UNPROTECTED
                requests += len(g.ledger.requests)
                pool_bytes += g.pool_bytes()
        with c.lock:
            return pb.Stats(
                parity_bytes_held=c.store.held_bytes,
                parity_budget_bytes=c.store.budget,
                pool_bytes_held=pool_bytes,
                chunks_protected=protected,
                chunks_unprotected=unprotected,
                chunks_queued=c.queue.pending(),
                evictions=c.store.evictions,
                encode_bytes=c.counters.encode_bytes,
                encode_seconds=c.counters.encode_seconds,
                rebuild_bytes=c.counters.rebuild_bytes,
                rebuild_seconds=c.counters.rebuild_seconds,
                groups=len(groups),
                requests=requests,
                move_bytes_received=self.receiver.bytes_received,
                moves_in_progress=len(self.receiver.staged),
            )

    @_mapped
    async def Flush(self, request: pb.FlushRequest, context: Any) -> pb.FlushResponse:
        drained, pending = await self._off(
            self.c.flush, request.group, timeout=_wait(request.timeout_seconds)
        )
        return pb.FlushResponse(drained=drained, chunks_queued=pending)

    @_mapped
    async def MoveGroup(self, request: pb.MoveGroupRequest, context: Any) -> pb.MoveGroupReply:
        # Operator only (see docs/sidecar.md, "Moving a group"): SIDECAR's authorization table lists it.
        try:
            return await self.mover.move(request)
        except grpc.aio.AioRpcError as exc:
            code, message = move.relay_error(exc, request.target)
            await context.abort(code, message)
            raise

    @_mapped
    async def ReceiveGroup(
        self, request_iterator: AsyncIterator[pb.MovePiece], context: Any
    ) -> pb.ReceiveGroupReply:
        # Sidecar to sidecar with the operator's (or a peer sidecar's) identity only.
        return await self.receiver.receive(request_iterator)
