"""Serving the Sidecar service: handlers built from the proto descriptor around the Servicer's methods.

Each call is, in order: size-checked (raw bytes, before anything is decoded), admitted against the
bytes all calls in flight may hold once decoded, decoded (an undecodable message is INVALID_ARGUMENT,
never UNKNOWN, and logs no traceback), authorized (`authz.RULES`, PERMISSION_DENIED), then handed to
the Servicer method of the same name with `authz.CALLER` set. Errors a method raises become status
codes through `service.status_of`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from ghostserve.sidecar import authz, errors, peercred, service
from ghostserve.v1 import sidecar_pb2 as pb
from google.protobuf import message as pb_message

log = logging.getLogger("ghostserve.sidecar")

SERVICE = "ghostserve.v1.Sidecar"
# Memory one request byte may become while its call runs (measured: a packed 1-byte varint takes ~14
# bytes in the decoded message, 8 in the NumPy array made from it, 8 more in the ledger's copy).
DECODE_FACTOR = 32


@dataclasses.dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 4 * 1024 * 1024
    max_inflight_bytes: int = 512 * 1024 * 1024  # decoded requests of all calls in flight


class Gate:
    """Bytes held by decoded requests in flight; a request that does not fit is refused, not queued."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.held + nbytes > self.capacity:
                return False
            self.held += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


class Rejected:
    """Stands in for a request that must not reach the handler."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


class Admitted:
    """A decoded request and its share of the gate, given back when this object dies (after the
    handler, or when gRPC drops a call it never handled)."""

    def __init__(self, msg: Any, gate: Gate, nbytes: int) -> None:
        self.msg = msg
        weakref.finalize(self, gate.give, nbytes)


def _deserializer(cls: Any, method: str, limits: Limits, gate: Gate) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        if len(raw) > limits.max_message_bytes:
            return Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{method}: a {len(raw)}-byte message exceeds {limits.max_message_bytes} bytes",
            )
        cost = len(raw) * DECODE_FACTOR
        if not gate.take(cost):
            return Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "sidecar busy: too many large requests in flight"
            )
        try:
            msg = cls.FromString(raw)
        except (pb_message.DecodeError, ValueError, RuntimeError) as exc:
            gate.give(cost)
            return Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: undecodable request: {exc}")
        return Admitted(msg, gate, cost)

    return decode


class Authorizer:
    """Resolves the caller of a call and checks the method's rule against the group it names."""

    def __init__(self, policy: authz.Policy, custodian: Any, unix_dir: Any) -> None:
        self.policy, self.c, self.unix_dir = policy, custodian, unix_dir

    def caller(self, context: grpc.aio.ServicerContext) -> authz.Caller:
        peer = context.peer() or ""
        if peer.startswith("unix:"):
            uid = peercred.uid_of(peer, self.unix_dir) if self.unix_dir is not None else None
            return self.policy.unix(uid)
        auth = context.auth_context() or {}
        if auth.get("transport_security_type") != [b"ssl"] or not context.peer_identities():
            return self.policy.tcp(None)
        names = [*auth.get("x509_common_name", []), *auth.get("x509_subject_alternative_name", [])]
        return self.policy.tcp(n.decode(errors="replace") for n in names)

    def check(self, method: str, msg: Any, caller: authz.Caller) -> None:
        rule = authz.RULES.get(method)
        if rule is None:
            raise errors.PermissionDenied(f"{method} has no authorization rule")
        name = getattr(msg, "group", "") if rule is not authz.Rule.ANY else ""
        creator, healthy = None, True
        if name:
            with self.c.lock:
                g = self.c.groups.get(name)
            if g is not None:
                creator, healthy = g.creator, g.healthy()
        authz.check(rule, caller, creator=creator, healthy=healthy, method=method)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, message = service.status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected-error", extra={"method": method}, exc_info=exc)
    await context.abort(code, message)


def _wrap(method: Any, fn: Callable[..., Any], auth: Authorizer) -> grpc.RpcMethodHandler:
    name = method.name

    async def admit(request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, authz.Caller]:
        if isinstance(request, Rejected):
            await context.abort(request.code, request.message)
        msg = request.msg
        caller = auth.caller(context)
        try:
            auth.check(name, msg, caller)
        except errors.SidecarError as exc:
            await _abort(context, exc, name)
        return msg, caller

    async def incoming(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for r in requests:
            if isinstance(r, Rejected):
                raise errors.InvalidArgument(r.message)
            yield r.msg

    if method.client_streaming and not method.server_streaming:

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            caller = auth.caller(context)
            try:
                auth.check(name, None, caller)
            except errors.SidecarError as exc:
                await _abort(context, exc, name)
            token = authz.CALLER.set(caller)
            try:
                return await fn(incoming(requests), context)
            finally:
                authz.CALLER.reset(token)

        return grpc.stream_unary_rpc_method_handler(stream_unary, request_deserializer=None)

    if method.server_streaming:

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            msg, caller = await admit(request, context)
            del request
            token = authz.CALLER.set(caller)
            try:
                async for reply in fn(msg, context):
                    yield reply
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:
                await _abort(context, exc, name)
            finally:
                authz.CALLER.reset(token)

        return grpc.unary_stream_rpc_method_handler(unary_stream)

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        msg, caller = await admit(request, context)
        del request
        token = authz.CALLER.set(caller)
        try:
            return await fn(msg, context)
        finally:
            authz.CALLER.reset(token)

    return grpc.unary_unary_rpc_method_handler(unary_unary)


def register(
    server: grpc.aio.Server,
    servicer: Any,
    *,
    policy: authz.Policy,
    limits: Limits,
    unix_dir: Any = None,
) -> Gate:
    """Add the Sidecar service to `server`, served by `servicer`'s methods. Returns the decode gate."""
    gate = Gate(limits.max_inflight_bytes)
    auth = Authorizer(policy, servicer.c, unix_dir)
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Sidecar"].methods:
        cls = getattr(pb, method.input_type.name)
        handler = _wrap(method, getattr(servicer, method.name), auth)
        handlers[method.name] = handler._replace(
            request_deserializer=_deserializer(cls, method.name, limits, gate),
            response_serializer=lambda m: m.SerializeToString(),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return gate
