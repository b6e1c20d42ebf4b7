"""gRPC clients of the sidecar: `SidecarClient` (blocking) and `AsyncSidecarClient` (grpc.aio).

Every rpc is one method, generated from the .proto into `client_rpcs` (scripts/gen_client.py): it takes
either a ready request message or its fields as typed keywords, sets a deadline (`timeout=` per call,
else the client's default; WatchHealth has none unless given) and returns the reply message (server
streams: an iterator; ReceiveGroup: takes an iterator of pieces). Failures come back as
`grpc.RpcError` with a status code (see docs/sidecar.md for what each code means). This module adds
the channel (address, TLS), health and the calls with a hand-made signature (flush).

This module imports only grpc and ghostserve.v1: the operator uses it and must not load codecs or numpy.
Addresses: `unix:///abs/path.sock` (the default endpoint) or `host:port` (TCP, optionally with TLS).
"""

from __future__ import annotations

import pathlib
from typing import Any

import grpc
import grpc.aio
from ghostserve.sidecar.client_rpcs import AsyncRpcs, SyncRpcs
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
    # Each client its own connection. With gRPC's global pool, every channel to an address shares one,
    # and its reconnect backoff: a client made to get past a restarted sidecar (the engines' sessions
    # do so after UNAVAILABLE) failed fast until an older client's backoff ran out, and the chunks
    # committed meanwhile were lost (tests/sidecar/test_client_reconnect.py).
    ("grpc.use_local_subchannel_pool", 1),
    # A channel that lost its sidecar retries the connection after 0.2 s, backing off to 2 s at most
    # (gRPC's default grows to 120 s): a long-lived client (the operator's, a session's) is usable
    # again within about 2 s of a restarted sidecar serving.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def channel_credentials(
    *, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM file paths; cert+key make it mutual TLS."""

    def read(path: str | None) -> bytes | None:
        return pathlib.Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )


def _options(server_name: str | None) -> list[tuple[str, Any]]:
    options = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


class _Connection:
    """The channel, the stubs and the default deadline, opened the same way for both clients."""

    _channels: Any  # grpc or grpc.aio: both offer insecure_channel/secure_channel with these arguments

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> None:
        options = _options(server_name)
        if credentials is None:
            self._channel = self._channels.insecure_channel(address, options=options)
        else:
            self._channel = self._channels.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.SidecarStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self.address = address


class SidecarClient(_Connection, SyncRpcs):
    """Blocking client. Use as a context manager or call `close()`."""

    _channels = grpc
    _channel: grpc.Channel

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel connects. Raises grpc.FutureTimeoutError past the deadline."""
        grpc.channel_ready_future(self._channel).result(timeout=self._t(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> int:
        """grpc.health.v1 status of `service` ("" = the whole server, or "ghostserve.v1.Sidecar")."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._t(timeout))
        return int(reply.status)

    def flush(self, group: str = "", *, wait: float = 30.0, timeout: float | None = None) -> pb.FlushResponse:
        """Wait up to `wait` seconds for queued encodes; the RPC deadline is `wait` + the call timeout."""
        msg = pb.FlushRequest(group=group, timeout_seconds=wait)
        reply: pb.FlushResponse = self._stub.Flush(msg, timeout=wait + self._t(timeout))
        return reply


class AsyncSidecarClient(_Connection, AsyncRpcs):
    """grpc.aio client with the same methods as SidecarClient, as coroutines (streams: async iterators)."""

    _channels = grpc.aio
    _channel: grpc.aio.Channel

    async def __aenter__(self) -> AsyncSidecarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def health(self, service: str = "", *, timeout: float | None = None) -> int:
        reply = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self._t(timeout)
        )
        return int(reply.status)

    async def flush(
        self, group: str = "", *, wait: float = 30.0, timeout: float | None = None
    ) -> pb.FlushResponse:
        msg = pb.FlushRequest(group=group, timeout_seconds=wait)
        reply: pb.FlushResponse = await self._stub.Flush(msg, timeout=wait + self._t(timeout))
        return reply
