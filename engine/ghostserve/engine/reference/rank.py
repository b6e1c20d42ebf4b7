"""One tensor-parallel rank of the reference engine, run as its own process.

The rank attaches to the sidecar, maps its pool (the sidecar keeps custody), joins the gloo group and
then executes the driver's messages: forward steps, resumes, digests. It implements EngineAdapter: it
commits every chunk its forward passes complete. It holds no state that cannot be rebuilt from the
driver's resume messages, so the driver may SIGKILL and restart it at any time.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

import grpc
import numpy as np
import torch
import torch.distributed as dist
from ghostserve.engine import adapter, sender
from ghostserve.engine.reference import config as config_mod
from ghostserve.engine.reference import devices, kvpool, model, schedule
from ghostserve.kernels import layout as layout_mod
from ghostserve.sidecar import client as client_mod
from ghostserve.sidecar import pools


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """Everything a rank process needs to start (picklable)."""

    config: config_mod.ModelConfig
    tp: int
    rank: int
    store_path: str
    sidecar: str
    group: str
    shape: kvpool.PoolShape
    protection: adapter.Protection
    threads: int = 1
    collective_timeout_s: float = 60.0
    protect: bool = True  # False: never commit chunks (protection off)
    device: devices.Device = dataclasses.field(default_factory=devices.Device)
    # While the sidecar restarts (UNAVAILABLE), attach is retried with backoff this long.
    attach_timeout_s: float = 60.0


@dataclasses.dataclass(frozen=True)
class Work:
    """One request's piece of a step: input tokens for positions [start, start+len(tokens)).

    new_slots: pool slots of those positions. commit: report chunks this piece completes (False when
    replaying chunks the sidecar already has).
    """

    request_id: str
    tokens: tuple[int, ...]
    start: int
    new_slots: tuple[int, ...]
    commit: bool = True
    rowwise: bool = False  # replay of decode steps (see model.Piece.rowwise)


@dataclasses.dataclass(frozen=True)
class Step:
    work: tuple[Work, ...]
    want_tokens: bool = True


@dataclasses.dataclass(frozen=True)
class Resume:
    """Re-admit a request whose KV for tokens[:len(tokens)] positions is in the pool at slots."""

    request_id: str
    tokens: tuple[int, ...]
    slots: tuple[int, ...]
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Drop:
    request_id: str


@dataclasses.dataclass(frozen=True)
class Digest:
    """Ask for sha256 of each chunk's shard of this rank for positions [0, kv_len)."""

    request_id: str
    kv_len: int


@dataclasses.dataclass(frozen=True)
class Commit:
    """Commit chunks this rank already holds (after a recovery recomputed them)."""

    request_id: str
    chunks: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Drain:
    """Wait until every chunk commit this rank queued reached the sidecar."""


@dataclasses.dataclass(frozen=True)
class Stop:
    pass


class GlooCollective:
    """All-reduce as all-gather + a sum in rank order: deterministic and batch-invariant."""

    def __init__(self, world: int) -> None:
        self.world = world

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        out = parts[0].clone()
        for p in parts[1:]:
            out.add_(p)
        return out


class RankAdapter:
    """The reference engine's EngineAdapter: its layout, its pool and its chunk commits."""

    def __init__(self, spec: RankSpec, session: adapter.SidecarSession) -> None:
        self.spec = spec
        self.session = session
        self.sender = sender.CommitSender(session)
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.prompt: dict[str, int] = {}

    def layout(self) -> layout_mod.KVLayout:
        s = self.spec.shape
        return layout_mod.KVLayout(s.layers, s.kv_heads, s.head_dim, kvpool.DTYPE, s.page_size, s.pool_slots)

    def allocate_pool(self) -> tuple[np.ndarray, bool]:
        result = self.session.attach()
        self._mmap, buf = pools.map_pool(result.pool)
        return buf, result.needs_rebuild

    def on_chunk_complete(
        self, request_id: str, chunk_index: int, slots: Sequence[int], token_ids: Sequence[int]
    ) -> None:
        self.sender.submit(request_id, chunk_index, slots, token_ids)

    def resume(
        self, request_id: str, tokens: Sequence[int], *, prompt_tokens: int, slots: Sequence[int]
    ) -> None:
        self.tables[request_id] = list(slots)
        self.tokens[request_id] = list(tokens)
        self.prompt[request_id] = prompt_tokens


def _run_step(
    msg: Step, ad: RankAdapter, weights: model.RankWeights, pool: torch.Tensor, coll: GlooCollective
) -> list[int] | None:
    pieces = []
    for w in msg.work:
        table, toks = ad.tables.setdefault(w.request_id, []), ad.tokens.setdefault(w.request_id, [])
        end = w.start + len(w.tokens)
        if w.start > len(table):
            raise ValueError(f"{w.request_id}: step starts at {w.start}, only {len(table)} positions known")
        # Replays overwrite positions in place (the slots are the same); new positions append.
        table[w.start : end] = w.new_slots
        toks[w.start : end] = w.tokens
        pieces.append(
            model.Piece(
                torch.tensor(w.tokens, dtype=torch.int64),
                w.start,
                torch.tensor(table[:end], dtype=torch.int64),
                w.rowwise,
            )
        )
    last = model.forward(weights, pieces, pool, coll)
    t = ad.spec.protection.chunk_tokens
    for w in msg.work:
        if not (w.commit and ad.spec.protect):
            continue
        for c in schedule.completed_chunks(w.start, w.start + len(w.tokens), t):
            ad.on_chunk_complete(
                w.request_id,
                c,
                ad.tables[w.request_id][c * t : (c + 1) * t],
                ad.tokens[w.request_id][c * t : (c + 1) * t],
            )
    return model.greedy(weights, last) if msg.want_tokens and ad.spec.rank == 0 else None


def _check_device(spec: RankSpec) -> None:
    """Exit as a CUDA process does when its GPU died (see devices.Device)."""
    try:
        spec.device.check()
    except devices.DeviceError as exc:
        sys.stderr.write(f"ghostserve rank {spec.rank}: device error: {exc}\n")
        os._exit(devices.EXIT_DEVICE_ERROR)


def _attach(spec: RankSpec, ad: RankAdapter) -> tuple[np.ndarray, bool]:
    """allocate_pool, retried with backoff (fresh channels) while the sidecar is unreachable."""
    deadline = time.monotonic() + spec.attach_timeout_s
    delay = 0.05
    while True:
        try:
            return ad.allocate_pool()
        except adapter.AdapterError as exc:
            cause = exc.__cause__
            transient = isinstance(cause, grpc.RpcError) and cause.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            if not transient or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(1.0, delay * 2)
        ad.session.client.close()
        ad.session.client = client_mod.SidecarClient(spec.sidecar)


def main(spec: RankSpec, conn: Connection) -> None:
    """Process entry point. Replies ("ready", needs_rebuild) then one reply per message."""
    _check_device(spec)
    torch.set_num_threads(spec.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{spec.store_path}",
        rank=spec.rank,
        world_size=spec.tp,
        timeout=datetime.timedelta(seconds=spec.collective_timeout_s),
    )
    client = client_mod.SidecarClient(spec.sidecar)
    session = adapter.SidecarSession(
        client,
        spec.group,
        rank=spec.rank,
        world_size=spec.tp,
        layout=layout_mod.KVLayout(
            spec.shape.layers,
            spec.shape.kv_heads,
            spec.shape.head_dim,
            kvpool.DTYPE,
            spec.shape.page_size,
            spec.shape.pool_slots,
        ),
        protection=spec.protection,
        worker_id=f"rank{spec.rank}-pid{os.getpid()}",
        reconnect=lambda: client_mod.SidecarClient(spec.sidecar),
        device_uuid=spec.device.uuid,
    )
    ad = RankAdapter(spec, session)
    buf, needs_rebuild = _attach(spec, ad)
    pool = kvpool.as_tensor(buf, spec.shape)
    weights = model.build_weights(spec.config, tp=spec.tp, rank=spec.rank)
    coll = GlooCollective(spec.tp)
    conn.send(("ready", needs_rebuild))
    while True:
        msg = conn.recv()
        if isinstance(msg, Stop):
            ad.sender.drain()
            conn.send(("ok", None))
            break
        try:
            _dispatch(msg, conn, ad, weights, pool, coll, buf)
        except (ValueError, KeyError, adapter.AdapterError) as exc:
            # Bad driver input is the same on every rank, so every rank reports it; nothing hangs.
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except RuntimeError as exc:
            # A peer died mid-collective (gloo "connection reset"): this generation is over. Exit without
            # a traceback; the driver sees the exit, kills the rest and starts a new generation. Anything
            # else is a bug: say so (the driver gives up after repeated faults on the same step).
            if "gloo" not in str(exc) and "Connection" not in str(exc):
                sys.stderr.write(f"ghostserve rank {spec.rank}: {type(exc).__name__}: {exc}\n")
            os._exit(3)
    session.client.close()
    dist.destroy_process_group()


def _dispatch(
    msg: object,
    conn: Connection,
    ad: RankAdapter,
    weights: model.RankWeights,
    pool: torch.Tensor,
    coll: GlooCollective,
    buf: np.ndarray,
) -> None:
    spec = ad.spec
    if isinstance(msg, Step):
        _check_device(spec)
        conn.send(("ok", _run_step(msg, ad, weights, pool, coll)))
    elif isinstance(msg, Resume):
        ad.resume(msg.request_id, msg.tokens, prompt_tokens=msg.prompt_tokens, slots=msg.slots)
        conn.send(("ok", None))
    elif isinstance(msg, Drop):
        # The driver releases the request next: no commit of it may arrive after that.
        ad.sender.drain()
        for table in (ad.tables, ad.tokens, ad.prompt):
            table.pop(msg.request_id, None)
        conn.send(("ok", None))
    elif isinstance(msg, Drain):
        ad.sender.drain()
        conn.send(("ok", None))
    elif isinstance(msg, Commit):
        t = spec.protection.chunk_tokens
        for c in msg.chunks:
            ad.on_chunk_complete(
                msg.request_id,
                c,
                ad.tables[msg.request_id][c * t : (c + 1) * t],
                ad.tokens[msg.request_id][c * t : (c + 1) * t],
            )
        ad.sender.drain()
        conn.send(("ok", None))
    elif isinstance(msg, Digest):
        slots = ad.tables[msg.request_id][: msg.kv_len]
        conn.send(("ok", kvpool.chunk_digests(buf, spec.shape, slots, spec.protection.chunk_tokens)))
    else:
        conn.send(("error", f"unknown message {type(msg).__name__}"))


# Type-checked: the reference rank implements the EngineAdapter protocol.
_CONFORMS: type[adapter.EngineAdapter] = RankAdapter
