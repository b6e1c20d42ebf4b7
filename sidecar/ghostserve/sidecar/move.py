"""MoveGroup, the source side: stream a whole group (every rank's pool, the ledger, the token records)
to another node's sidecar through its ReceiveGroup RPC.

One move is two ReceiveGroup calls: a header-only call asks what the target already holds (nothing, a
prefix of the pools from an interrupted move, or the whole group), then one stream sends the header,
the remaining pool pieces (each with its xxh3-64) and a commit carrying the ledger. The target installs
the group only once every byte arrived and every pool matches the checksum in the header, so a move
cut at any point leaves nothing valid there, and calling MoveGroup again resumes from the target's
offset. The source keeps its copy (the operator deletes it after the move succeeded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt
from ghostserve.kernels import checksums
from ghostserve.sidecar import client, convert, custodian, errors
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.v1 import sidecar_pb2_grpc as pb_grpc

log = logging.getLogger("ghostserve.sidecar")

PIECE_BYTES = 4 * 1024 * 1024 - 64 * 1024  # the whole message stays under gRPC's default 4 MiB
MIN_PIECE_BYTES = 4096
PROBE_TIMEOUT_S = 30.0
RECEIVE_METHOD = "/ghostserve.v1.Sidecar/ReceiveGroup"
TARGET = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):[0-9]{1,5}$")


@dataclasses.dataclass
class Snapshot:
    """What a move sends: the header, each rank's pool and the serialized ledger."""

    header: pb.MoveHeader
    pools: list[npt.NDArray[np.uint8]]
    ledger: bytes
    requests: int

    @property
    def total(self) -> int:
        return sum(p.size for p in self.pools)


def check_target(target: str) -> None:
    if not TARGET.match(target):
        raise errors.InvalidArgument(f"target must be host:port of the target sidecar, got {target[:80]!r}")


def moved_ledger(c: custodian.Custodian, name: str) -> tuple[pb.MovedLedger, list[npt.NDArray[np.uint8]]]:
    """The group's movable ledger (chunks whose KV is valid on every rank, token records) and its pools.

    Raises NotFound (unknown group), FailedPrecondition (a rank without a valid pool: rebuild first)."""
    with c.locked(name) as g:
        bad = [r for r, rp in enumerate(g.ranks) if not rp.valid or rp.segment is None]
        if bad:
            raise errors.FailedPrecondition(
                f"ranks {bad} of {name!r} hold no valid pool: rebuild them before moving the group"
            )
        out = pb.MovedLedger()
        for rid, req in sorted(g.ledger.requests.items()):
            chunks = [ch for _, ch in sorted(req.chunks.items()) if c.kv_valid(g, ch)]
            if not chunks and not req.tokens.size:
                continue
            out.requests.append(
                pb.MovedRequest(
                    request_id=rid,
                    token_ids=req.tokens.tolist(),
                    prompt_tokens=req.prompt_tokens,
                    max_new_tokens=req.max_new_tokens,
                    chunks=[
                        pb.MovedChunk(
                            chunk_index=ch.index, slots=ch.slots.tolist(), token_ids=ch.token_ids.tolist()
                        )
                        for ch in chunks
                    ],
                )
            )
        return out, [rp.segment.array for rp in g.ranks if rp.segment is not None]


def snapshot(c: custodian.Custodian, name: str) -> Snapshot:
    """Blocking (hashes every pool): run it off the event loop."""
    ledger_msg, pools = moved_ledger(c, name)
    with c.locked(name) as g:
        header = pb.MoveHeader(
            group=name,
            uid=g.uid,
            world_size=g.settings.world_size,
            layout=convert.layout_to(g.layout),
            protection=convert.protection_to(g.protection),
            parity_budget_bytes=g.budget_bytes,
            source_node=c.config.node,
            creator=g.creator,
        )
    # Hashed outside the lock: the ranks are not running (the replica is being replaced), and a pool
    # that did change would fail the target's check, never be installed wrong.
    header.pool_checksums.extend(checksums.checksum(p) for p in pools)
    return Snapshot(header, pools, ledger_msg.SerializeToString(), len(ledger_msg.requests))


async def _header_only(header: pb.MoveHeader) -> AsyncIterator[pb.MovePiece]:
    yield pb.MovePiece(header=header)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def encode_piece(offset: int, data: npt.NDArray[np.uint8]) -> bytes:
    """The wire form of MovePiece{offset, data, checksum}, built with one copy of `data` (the generated
    code would copy it three times: to bytes, into the message, into the serialization)."""
    view = data.data.cast("B")
    digest = checksums.checksum(view)
    # Field 2 (offset, varint), 3 (data, length-delimited), 4 (checksum, varint): tags 0x10, 0x1A, 0x20;
    # zeros are left out, as the generated code does (byte-identical output, tested).
    head = (b"\x10" + _varint(offset) if offset else b"") + b"\x1a" + _varint(len(view))
    tail = b"\x20" + _varint(digest) if digest else b""
    return b"".join((head, view, tail))


def _serialize(item: pb.MovePiece | bytes) -> bytes:
    return item if isinstance(item, bytes) else item.SerializeToString()


async def _pieces(
    snap: Snapshot, start: int, piece_bytes: int, sent: list[int] | None = None
) -> AsyncIterator[pb.MovePiece | bytes]:
    """Header, pool pieces from `start` (never across two ranks' pools), the ledger in parts, the
    last part with the commit. `sent[0]` counts the pool and ledger bytes handed to gRPC."""
    sent = sent if sent is not None else [0]
    yield pb.MovePiece(header=snap.header)
    base = 0
    for pool in snap.pools:
        end = base + pool.size
        off = max(start, base)
        while off < end:
            view = pool[off - base : min(off - base + piece_bytes, pool.size)]
            yield encode_piece(off, view)
            off += view.size
            sent[0] += view.size
        base = end
    ledger = snap.ledger
    for off in range(0, max(len(ledger) - piece_bytes, 0), piece_bytes):
        yield pb.MovePiece(ledger=ledger[off : off + piece_bytes])
        sent[0] += piece_bytes
    last = ledger[(max(len(ledger) - 1, 0) // piece_bytes) * piece_bytes :]
    yield pb.MovePiece(ledger=last, ledger_checksum=checksums.checksum(ledger), commit=True)
    sent[0] += len(last)


class Mover:
    """Runs MoveGroup for one sidecar; `credentials` (mTLS to the peer sidecars) when TLS is on."""

    def __init__(self, c: custodian.Custodian, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.c = c
        self.credentials = credentials
        self.bytes_sent = 0

    def _channel(self, request: pb.MoveGroupRequest) -> grpc.aio.Channel:
        options = list(client.CHANNEL_OPTIONS)
        if self.credentials is None:
            return grpc.aio.insecure_channel(request.target, options=options)
        if request.target_server_name:
            options.append(("grpc.ssl_target_name_override", request.target_server_name))
        return grpc.aio.secure_channel(request.target, self.credentials, options=options)

    async def move(self, request: pb.MoveGroupRequest) -> pb.MoveGroupReply:
        """Raises sidecar errors; the target's refusals come back as grpc.aio.AioRpcError."""
        check_target(request.target)
        if request.piece_bytes and not MIN_PIECE_BYTES <= request.piece_bytes <= PIECE_BYTES:
            raise errors.InvalidArgument(
                f"piece_bytes must be 0 or in [{MIN_PIECE_BYTES}, {PIECE_BYTES}], got {request.piece_bytes}"
            )
        piece_bytes = request.piece_bytes or PIECE_BYTES
        start_t = time.perf_counter()
        snap = await asyncio.to_thread(snapshot, self.c, request.group)
        async with self._channel(request) as channel:
            stub = pb_grpc.SidecarStub(channel)
            held = await stub.ReceiveGroup(_header_only(snap.header), timeout=PROBE_TIMEOUT_S)
            if held.total_bytes != snap.total:
                raise errors.FailedPrecondition(
                    f"target expects {held.total_bytes} pool bytes, the group has {snap.total}"
                )
            reply = pb.MoveGroupReply(
                ranks_moved=len(snap.pools),
                requests_moved=snap.requests,
                resumed_from_bytes=held.received_bytes,
            )
            if held.complete:
                reply.seconds = time.perf_counter() - start_t
                return reply
            # No deadline: the caller's own deadline cancels this handler, which cancels the stream.
            # Pool pieces go out pre-serialized (encode_piece); the rest as messages.
            receive = channel.stream_unary(
                RECEIVE_METHOD,
                request_serializer=_serialize,
                response_deserializer=pb.ReceiveGroupReply.FromString,
            )
            sent = [0]
            done = await receive(_pieces(snap, held.received_bytes, piece_bytes, sent))
            if not done.complete:
                raise errors.Unavailable(
                    f"target holds {done.received_bytes} of {done.total_bytes} bytes after the stream"
                )
        reply.bytes_moved = sent[0]
        reply.seconds = time.perf_counter() - start_t
        self.bytes_sent += reply.bytes_moved
        log.info(
            "group-moved",
            extra={
                "group": request.group,
                "target": request.target,
                "bytes": reply.bytes_moved,
                "resumed_from": reply.resumed_from_bytes,
                "seconds": round(reply.seconds, 3),
            },
        )
        return reply


def relay_error(exc: grpc.aio.AioRpcError, target: str) -> tuple[grpc.StatusCode, str]:
    """The status a MoveGroup caller gets for the target's refusal (same code, the target named).

    A connection cut in the middle of a frame reaches us from gRPC core as INTERNAL ("Internal error
    from Core", RST_STREAM...), which callers read as a bug; it is a network failure: UNAVAILABLE, call
    MoveGroup again. The target's own INTERNAL errors say "internal error: ..." (service.status_of)."""
    code, details = exc.code(), exc.details() or ""
    transport = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    if transport and not details.startswith("internal error"):
        code = grpc.StatusCode.UNAVAILABLE
    return code, f"target {target}: {details}"
