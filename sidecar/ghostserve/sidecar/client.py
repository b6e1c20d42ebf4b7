"""gRPC clients of the sidecar: `SidecarClient` (blocking) and `AsyncSidecarClient` (grpc.aio).

Thin wrappers: every method takes either a ready request message or its fields as keywords, sets a
deadline (`timeout=` per call, else the client's default) and returns the reply message. Failures come
back as `grpc.RpcError` with a status code (see docs/sidecar.md for what each code means).

This module imports only grpc and ghostserve.v1: the operator uses it and must not load codecs or numpy.
Addresses: `unix:///abs/path.sock` (the default endpoint) or `host:port` (TCP, optionally with TLS).
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.v1 import sidecar_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "unix:///run/ghostserve/sidecar.sock"
DEFAULT_TIMEOUT = 10.0
# Streamed pieces are <= 4 MiB of data plus a few fields; leave headroom above gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

M = TypeVar("M")


def _message(cls: type[M], request: M | None, fields: dict[str, Any]) -> M:
    if request is not None and fields:
        raise TypeError("pass either a request message or its fields, not both")
    return request if request is not None else cls(**fields)


def channel_credentials(
    *, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM file paths; cert+key make it mutual TLS."""

    def read(path: str | None) -> bytes | None:
        return pathlib.Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )


class SidecarClient:
    """Blocking client. Use as a context manager or call `close()`."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> None:
        options = list(CHANNEL_OPTIONS)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.SidecarStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self.address = address

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel connects. Raises grpc.FutureTimeoutError past the deadline."""
        grpc.channel_ready_future(self._channel).result(timeout=self._t(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> int:
        """grpc.health.v1 status of `service` ("" = the whole server, or "ghostserve.v1.Sidecar")."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._t(timeout))
        return int(reply.status)

    def attach(
        self, request: pb.AttachRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.AttachResponse:
        return self._stub.Attach(_message(pb.AttachRequest, request, fields), timeout=self._t(timeout))

    def detach(
        self, request: pb.DetachRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.DetachResponse:
        return self._stub.Detach(_message(pb.DetachRequest, request, fields), timeout=self._t(timeout))

    def commit_chunk(
        self, request: pb.CommitChunkRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.CommitChunkResponse:
        return self._stub.CommitChunk(
            _message(pb.CommitChunkRequest, request, fields), timeout=self._t(timeout)
        )

    def record_tokens(
        self, request: pb.RecordTokensRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.RecordTokensResponse:
        msg = _message(pb.RecordTokensRequest, request, fields)
        return self._stub.RecordTokens(msg, timeout=self._t(timeout))

    def release_request(
        self, request: pb.ReleaseRequestRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.ReleaseRequestResponse:
        msg = _message(pb.ReleaseRequestRequest, request, fields)
        return self._stub.ReleaseRequest(msg, timeout=self._t(timeout))

    def describe_group(
        self, request: pb.DescribeGroupRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.GroupDescription:
        msg = _message(pb.DescribeGroupRequest, request, fields)
        return self._stub.DescribeGroup(msg, timeout=self._t(timeout))

    def describe_request(
        self, request: pb.DescribeRequestRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.RequestLedger:
        msg = _message(pb.DescribeRequestRequest, request, fields)
        return self._stub.DescribeRequest(msg, timeout=self._t(timeout))

    def list_groups(self, *, timeout: float | None = None) -> pb.ListGroupsResponse:
        return self._stub.ListGroups(pb.ListGroupsRequest(), timeout=self._t(timeout))

    def delete_group(
        self, request: pb.DeleteGroupRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.DeleteGroupResponse:
        return self._stub.DeleteGroup(
            _message(pb.DeleteGroupRequest, request, fields), timeout=self._t(timeout)
        )

    def mark_lost(
        self, request: pb.MarkLostRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.MarkLostResponse:
        return self._stub.MarkLost(_message(pb.MarkLostRequest, request, fields), timeout=self._t(timeout))

    def plan_recovery(
        self, request: pb.PlanRecoveryRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.RecoveryPlan:
        msg = _message(pb.PlanRecoveryRequest, request, fields)
        return self._stub.PlanRecovery(msg, timeout=self._t(timeout))

    def rebuild(
        self, request: pb.RebuildRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.RebuildReport:
        return self._stub.Rebuild(_message(pb.RebuildRequest, request, fields), timeout=self._t(timeout))

    def stream_rebuild(
        self, request: pb.StreamRebuildRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> Iterator[pb.RebuiltShardPiece]:
        """Pieces of one lost rank's rebuilt shards; `timeout` bounds the whole stream."""
        msg = _message(pb.StreamRebuildRequest, request, fields)
        return self._stub.StreamRebuild(msg, timeout=self._t(timeout))

    def watch_health(
        self, request: pb.WatchHealthRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> Iterator[pb.HealthEvent]:
        """Health events as they happen; `timeout` bounds the whole stream (cancel() the iterator to stop)."""
        msg = _message(pb.WatchHealthRequest, request, fields)
        return self._stub.WatchHealth(msg, timeout=timeout)

    def inject_fault(
        self, request: pb.InjectFaultRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.InjectFaultResponse:
        msg = _message(pb.InjectFaultRequest, request, fields)
        return self._stub.InjectFault(msg, timeout=self._t(timeout))

    def get_stats(self, *, timeout: float | None = None) -> pb.Stats:
        return self._stub.GetStats(pb.GetStatsRequest(), timeout=self._t(timeout))

    def flush(self, group: str = "", *, wait: float = 30.0, timeout: float | None = None) -> pb.FlushResponse:
        """Wait up to `wait` seconds for queued encodes; the RPC deadline is `wait` + the call timeout."""
        msg = pb.FlushRequest(group=group, timeout_seconds=wait)
        return self._stub.Flush(msg, timeout=wait + self._t(timeout))


class AsyncSidecarClient:
    """grpc.aio client with the same methods as SidecarClient, as coroutines (streams: async iterators)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> None:
        options = list(CHANNEL_OPTIONS)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.SidecarStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self.address = address

    async def __aenter__(self) -> AsyncSidecarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def health(self, service: str = "", *, timeout: float | None = None) -> int:
        reply = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self._t(timeout)
        )
        return int(reply.status)

    async def attach(
        self, request: pb.AttachRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.AttachResponse:
        return await self._stub.Attach(_message(pb.AttachRequest, request, fields), timeout=self._t(timeout))

    async def detach(
        self, request: pb.DetachRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.DetachResponse:
        return await self._stub.Detach(_message(pb.DetachRequest, request, fields), timeout=self._t(timeout))

    async def commit_chunk(
        self, request: pb.CommitChunkRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.CommitChunkResponse:
        msg = _message(pb.CommitChunkRequest, request, fields)
        return await self._stub.CommitChunk(msg, timeout=self._t(timeout))

    async def record_tokens(
        self, request: pb.RecordTokensRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.RecordTokensResponse:
        msg = _message(pb.RecordTokensRequest, request, fields)
        return await self._stub.RecordTokens(msg, timeout=self._t(timeout))

    async def release_request(
        self, request: pb.ReleaseRequestRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.ReleaseRequestResponse:
        msg = _message(pb.ReleaseRequestRequest, request, fields)
        return await self._stub.ReleaseRequest(msg, timeout=self._t(timeout))

    async def describe_group(
        self, request: pb.DescribeGroupRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.GroupDescription:
        msg = _message(pb.DescribeGroupRequest, request, fields)
        return await self._stub.DescribeGroup(msg, timeout=self._t(timeout))

    async def describe_request(
        self, request: pb.DescribeRequestRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.RequestLedger:
        msg = _message(pb.DescribeRequestRequest, request, fields)
        return await self._stub.DescribeRequest(msg, timeout=self._t(timeout))

    async def list_groups(self, *, timeout: float | None = None) -> pb.ListGroupsResponse:
        return await self._stub.ListGroups(pb.ListGroupsRequest(), timeout=self._t(timeout))

    async def delete_group(
        self, request: pb.DeleteGroupRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.DeleteGroupResponse:
        msg = _message(pb.DeleteGroupRequest, request, fields)
        return await self._stub.DeleteGroup(msg, timeout=self._t(timeout))

    async def mark_lost(
        self, request: pb.MarkLostRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.MarkLostResponse:
        return await self._stub.MarkLost(
            _message(pb.MarkLostRequest, request, fields), timeout=self._t(timeout)
        )

    async def plan_recovery(
        self, request: pb.PlanRecoveryRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.RecoveryPlan:
        msg = _message(pb.PlanRecoveryRequest, request, fields)
        return await self._stub.PlanRecovery(msg, timeout=self._t(timeout))

    async def rebuild(
        self, request: pb.RebuildRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.RebuildReport:
        return await self._stub.Rebuild(
            _message(pb.RebuildRequest, request, fields), timeout=self._t(timeout)
        )

    def stream_rebuild(
        self, request: pb.StreamRebuildRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> AsyncIterator[pb.RebuiltShardPiece]:
        """Async iterator of pieces; cancel the returned call (or stop iterating) to stop the server."""
        msg = _message(pb.StreamRebuildRequest, request, fields)
        return self._stub.StreamRebuild(msg, timeout=self._t(timeout))

    def watch_health(
        self, request: pb.WatchHealthRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> AsyncIterator[pb.HealthEvent]:
        msg = _message(pb.WatchHealthRequest, request, fields)
        return self._stub.WatchHealth(msg, timeout=timeout)

    async def inject_fault(
        self, request: pb.InjectFaultRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.InjectFaultResponse:
        msg = _message(pb.InjectFaultRequest, request, fields)
        return await self._stub.InjectFault(msg, timeout=self._t(timeout))

    async def get_stats(self, *, timeout: float | None = None) -> pb.Stats:
        return await self._stub.GetStats(pb.GetStatsRequest(), timeout=self._t(timeout))

    async def flush(
        self, group: str = "", *, wait: float = 30.0, timeout: float | None = None
    ) -> pb.FlushResponse:
        msg = pb.FlushRequest(group=group, timeout_seconds=wait)
        return await self._stub.Flush(msg, timeout=wait + self._t(timeout))
