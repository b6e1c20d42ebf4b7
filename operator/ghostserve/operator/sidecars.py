"""Every call the operator makes to node sidecars, behind one small interface.

`SidecarPort` is what the reconciler depends on; `GrpcSidecars` implements it with the generated
ghostserve.v1 stub (one cached channel per address, mTLS when configured, a timeout on every call).
A group the sidecar does not hold (NOT_FOUND) is not an error here: it holds nothing to lose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio
from ghostserve.v1 import sidecar_pb2, sidecar_pb2_grpc


@dataclasses.dataclass(frozen=True)
class RebuildOutcome:
    bytes_rebuilt: int = 0
    chunks_rebuilt: int = 0
    chunks_recomputed: int = 0
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class GroupFigures:
    protected_chunks: int
    unprotected_chunks: int
    parity_bytes: int


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    ca: str
    cert: str
    key: str
    server_name: str | None = None


class SidecarPort(Protocol):
    async def mark_lost(self, address: str, group: str, ranks: Sequence[int], reason: str) -> bool: ...
    async def plan_and_rebuild(self, address: str, group: str, ranks: Sequence[int]) -> RebuildOutcome: ...
    async def delete_group(self, address: str, group: str) -> bool: ...
    async def describe(self, address: str, group: str) -> GroupFigures | None: ...
    def watch_health(self, address: str) -> AsyncIterator[dict[str, Any]]: ...
    async def close(self) -> None: ...


def _credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(read(tls.ca), read(tls.key), read(tls.cert))


class GrpcSidecars:
    """SidecarPort over gRPC. Raises grpc.aio.AioRpcError for failures other than NOT_FOUND."""

    def __init__(self, *, timeout: float = 10.0, tls: TLSFiles | None = None) -> None:
        self._timeout = timeout
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> sidecar_pb2_grpc.SidecarStub:
        channel = self._channels.get(address)
        if channel is None:
            if self._tls is not None and not address.startswith("unix:"):
                options = (
                    [("grpc.ssl_target_name_override", self._tls.server_name)]
                    if self._tls.server_name
                    else []
                )
                channel = grpc.aio.secure_channel(address, _credentials(self._tls), options=options)
            else:
                channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        return sidecar_pb2_grpc.SidecarStub(channel)

    async def mark_lost(self, address: str, group: str, ranks: Sequence[int], reason: str) -> bool:
        """False when the sidecar holds no such group."""
        try:
            await self._stub(address).MarkLost(
                sidecar_pb2.MarkLostRequest(group=group, ranks=list(ranks), reason=reason),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def plan_and_rebuild(self, address: str, group: str, ranks: Sequence[int]) -> RebuildOutcome:
        """PlanRecovery then Rebuild of the chunks the plan does not recompute."""
        stub = self._stub(address)
        try:
            plan = await stub.PlanRecovery(
                sidecar_pb2.PlanRecoveryRequest(group=group, lost_ranks=list(ranks)), timeout=self._timeout
            )
            first = {p.request_id: p.recompute_chunks for p in plan.requests}
            report = await stub.Rebuild(
                sidecar_pb2.RebuildRequest(
                    group=group, lost_ranks=list(ranks), request_ids=list(first), first_chunk=first
                ),
                timeout=self._timeout * 6,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return RebuildOutcome()
            raise
        recomputed = sum(p.recompute_chunks + len(p.unprotected_chunks) for p in plan.requests)
        recomputed += sum(len(r.failed_chunks) for r in report.requests)
        rebuilt = sum(len(r.rebuilt_chunks) for r in report.requests)
        return RebuildOutcome(int(report.bytes_rebuilt), rebuilt, recomputed, float(report.seconds))

    async def delete_group(self, address: str, group: str) -> bool:
        try:
            await self._stub(address).DeleteGroup(
                sidecar_pb2.DeleteGroupRequest(group=group), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def describe(self, address: str, group: str) -> GroupFigures | None:
        try:
            desc = await self._stub(address).DescribeGroup(
                sidecar_pb2.DescribeGroupRequest(group=group), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        protected = sum(r.chunks_protected for r in desc.requests)
        committed = sum(r.chunks_committed for r in desc.requests)
        return GroupFigures(protected, max(0, committed - protected), int(desc.parity_bytes))

    async def watch_health(self, address: str) -> AsyncIterator[dict[str, Any]]:
        """Health events as dicts (`kind` by HealthKind name), current state first; ends with the stream."""
        call = self._stub(address).WatchHealth(sidecar_pb2.WatchHealthRequest(initial_state=True))
        try:
            async for event in call:
                yield {
                    "gpu_index": event.gpu_index,
                    "gpu_uuid": event.gpu_uuid,
                    "kind": sidecar_pb2.HealthKind.Name(event.kind),
                    "xid": event.xid,
                    "fatal": event.fatal,
                    "message": event.message,
                    "time": event.time,
                    "node": event.node,
                }
        finally:
            call.cancel()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
