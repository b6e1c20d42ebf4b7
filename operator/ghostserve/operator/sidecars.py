"""Every call the operator makes to node sidecars, behind one small interface.

`SidecarPort` is what the reconciler depends on; `GrpcSidecars` implements it with the sidecar's
own async client (ghostserve.sidecar.client: grpc + ghostserve.v1 only), one client per address,
mTLS when configured, a deadline on every call. A group the sidecar does not hold (NOT_FOUND) is
not an error here: the sidecar holds nothing of it to lose, free or rebuild.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio
from ghostserve.operator import record
from ghostserve.sidecar import client
from ghostserve.v1 import sidecar_pb2


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
    # rank -> GPU UUID it attached with (C3; empty strings until the sidecar reports them)
    device_uuids: dict[int, str] = dataclasses.field(default_factory=dict)
    valid_ranks: int = 0  # ranks whose pool holds valid KV
    world_size: int = 0
    pool_bytes: int = 0
    # What Rebuild restored into the group on this sidecar so far, by any caller (the engine at attach too)
    bytes_rebuilt: int = 0
    chunks_rebuilt: int = 0


@dataclasses.dataclass(frozen=True)
class MoveOutcome:
    bytes_moved: int = 0
    ranks_moved: int = 0
    requests_moved: int = 0
    resumed_from_bytes: int = 0


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
    async def move_group(self, address: str, group: str, target: str) -> MoveOutcome: ...
    def watch_health(self, address: str) -> AsyncIterator[dict[str, Any]]: ...
    async def close(self) -> None: ...


def _not_found(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.NOT_FOUND


class GrpcSidecars:
    """SidecarPort over gRPC. Raises grpc.aio.AioRpcError for failures other than NOT_FOUND."""

    def __init__(self, *, timeout: float = 10.0, tls: TLSFiles | None = None) -> None:
        self._timeout = timeout
        self._tls = tls
        self._clients: dict[str, client.AsyncSidecarClient] = {}

    def _client(self, address: str) -> client.AsyncSidecarClient:
        found = self._clients.get(address)
        if found is None:
            credentials = None
            if self._tls is not None and not address.startswith("unix:"):
                credentials = client.channel_credentials(
                    ca=self._tls.ca, cert=self._tls.cert, key=self._tls.key
                )
            server_name = self._tls.server_name if self._tls is not None else None
            found = client.AsyncSidecarClient(
                address, timeout=self._timeout, credentials=credentials, server_name=server_name
            )
            self._clients[address] = found
        return found

    async def mark_lost(self, address: str, group: str, ranks: Sequence[int], reason: str) -> bool:
        """Wipe and invalidate the ranks' pools; False when the sidecar holds no such group."""
        try:
            await self._client(address).mark_lost(group=group, ranks=list(ranks), reason=reason)
        except grpc.aio.AioRpcError as exc:
            if _not_found(exc):
                return False
            raise
        return True

    async def plan_and_rebuild(self, address: str, group: str, ranks: Sequence[int]) -> RebuildOutcome:
        """PlanRecovery, then Rebuild of the chunks the plan does not leave to recompute."""
        side = self._client(address)
        try:
            plan = await side.plan_recovery(group=group, lost_ranks=list(ranks))
            first = {p.request_id: p.recompute_chunks for p in plan.requests}
            report = await side.rebuild(
                group=group,
                lost_ranks=list(ranks),
                request_ids=list(first),
                first_chunk=first,
                timeout=self._timeout * 6,
            )
        except grpc.aio.AioRpcError as exc:
            if _not_found(exc):
                return RebuildOutcome()
            raise
        recomputed = record.chunks_recomputed(
            {p.request_id: (int(p.recompute_chunks), list(p.unprotected_chunks)) for p in plan.requests},
            {r.request_id: [int(f.chunk_index) for f in r.failed_chunks] for r in report.requests},
        )
        rebuilt = sum(len(r.rebuilt_chunks) for r in report.requests)
        return RebuildOutcome(int(report.bytes_rebuilt), rebuilt, recomputed, float(report.seconds))

    async def delete_group(self, address: str, group: str) -> bool:
        """Free the group's pools, parity and ledger; False when it was not there."""
        try:
            await self._client(address).delete_group(group=group)
        except grpc.aio.AioRpcError as exc:
            if _not_found(exc):
                return False
            raise
        return True

    async def describe(self, address: str, group: str) -> GroupFigures | None:
        try:
            desc = await self._client(address).describe_group(group=group)
        except grpc.aio.AioRpcError as exc:
            if _not_found(exc):
                return None
            raise
        protected = sum(r.chunks_protected for r in desc.requests)
        committed = sum(r.chunks_committed for r in desc.requests)
        return GroupFigures(
            protected,
            max(0, committed - protected),
            int(desc.parity_bytes),
            # getattr: device_uuid is the C3 addition; a sidecar built before it reports none.
            {int(r.rank): str(getattr(r, "device_uuid", "")) for r in desc.ranks},
            sum(1 for r in desc.ranks if r.pool_valid),
            int(desc.world_size),
            int(desc.pool_bytes),
            # getattr: a sidecar built before these fields reports none (0).
            int(getattr(desc, "bytes_rebuilt", 0)),
            int(getattr(desc, "chunks_rebuilt", 0)),
        )

    async def move_group(self, address: str, group: str, target: str) -> MoveOutcome:
        """MoveGroup on the SOURCE sidecar at `address`: it streams the group to the sidecar at `target`
        (chunked, checksummed, resumable; bytes_moved 0 when the target already holds all of it)."""
        side = self._client(address)
        # The target is dialed by IP; with mTLS its certificate names the sidecars' shared server name.
        server_name = self._tls.server_name if self._tls is not None else None
        reply = await side.move_group(
            group=group, target=target, target_server_name=server_name, timeout=self._timeout * 30
        )
        return MoveOutcome(
            int(reply.bytes_moved),
            int(reply.ranks_moved),
            int(reply.requests_moved),
            int(reply.resumed_from_bytes),
        )

    async def watch_health(self, address: str) -> AsyncIterator[dict[str, Any]]:
        """Health events as dicts (`kind` by HealthKind name), current state first; ends with the stream."""
        call: Any = self._client(address).watch_health(initial_state=True)
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
                    # C3: the rank that attached with gpu_uuid (group empty: no rank holds that GPU).
                    "group": getattr(event, "group", ""),
                    "rank": getattr(event, "rank", 0),
                }
        finally:
            call.cancel()

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for found in clients:
            await found.close()
