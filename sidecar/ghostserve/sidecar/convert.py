"""Conversions between ghostserve.v1 messages and the sidecar's plain values (no state, no I/O)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import coding, errors, group, ledger, planner, pools, recovery
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.wire import layout as wire_layout
from ghostserve.wire import protection as wire_protection

M = TypeVar("M")
T = TypeVar("T")


def _checked(convert: Callable[[M], T], msg: M) -> T:
    """`convert(msg)`, its ValueError (the wire layer's "bad message") raised as InvalidArgument."""
    try:
        return convert(msg)
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc)) from exc


def layout_from(msg: pb.KVLayout) -> kvlayout.KVLayout:
    """Raises InvalidArgument for a missing dtype or zero sizes."""
    return _checked(wire_layout.layout_from, msg)


def layout_to(lay: kvlayout.KVLayout) -> pb.KVLayout:
    return wire_layout.layout_to(lay)


def protection_from(msg: pb.Protection, world_size: int) -> coding.Protection:
    """Raises InvalidArgument for a missing code or a parity count the code does not have."""
    return _checked(wire_protection.protection_from, msg)


def protection_to(p: coding.Protection) -> pb.Protection:
    return wire_protection.protection_to(p)


def settings_from(msg: pb.AttachRequest) -> group.Settings:
    return group.Settings(
        msg.world_size, layout_from(msg.layout), protection_from(msg.protection, msg.world_size)
    )


def pool_to(info: pools.PoolInfo | None) -> pb.PoolHandle:
    if info is None:
        return pb.PoolHandle()
    return pb.PoolHandle(
        kind=info.kind,
        shm_name=info.shm_name,
        nbytes=info.nbytes,
        row_bytes=info.row_bytes,
        generation=info.generation,
    )


FAST_COPY_VALUES = 1 << 16


def int_array(values: Sequence[int], *, what: str, limit: int) -> npt.NDArray[np.int64]:
    """`values` (a repeated proto field) as int64, its length checked before anything is converted."""
    if len(values) > limit:
        raise errors.InvalidArgument(f"{what}: {len(values)} values, at most {limit} allowed")
    if len(values) <= FAST_COPY_VALUES and hasattr(values, "__array__"):
        # upb's repeated fields copy their values out in one memcpy: 4x faster than iterating for a
        # chunk's 256 slots, on the path of every commit (32 fields per CommitChunks of 16 chunks).
        # Long token lists keep the iteration: with it, a flood of maximal RecordTokens calls is decoded
        # slowly enough that the 200-client soak stays within its stated bound; with the memcpy its peak
        # RSS went from 190-280 to 260-360 MiB (transient memory the decode gate does not bound).
        return np.array(values, dtype=np.int64)
    # Anything else is iterated into a preallocated array: np.asarray would build a list of Python ints
    # first (~40 bytes per value, x5 the array).
    return np.fromiter(values, dtype=np.int64, count=len(values))


def describe(g: group.Group) -> pb.GroupDescription:
    ranks = [
        pb.RankState(
            rank=r,
            attached=rp.attached,
            pool_valid=rp.valid,
            worker_id=rp.worker_id,
            pool=pool_to(g.pool_info(r)),
            device_uuid=rp.device_uuid,
        )
        for r, rp in enumerate(g.ranks)
    ]
    requests = [
        pb.RequestState(
            request_id=rid,
            chunks_committed=len(req.complete_chunks()),
            chunks_protected=req.protected_count(),
            tokens=int(req.tokens.size),
            prompt_tokens=req.prompt_tokens,
            parity_bytes=req.parity_bytes(),
        )
        for rid, req in sorted(g.ledger.requests.items())
    ]
    return pb.GroupDescription(
        group=g.name,
        world_size=g.settings.world_size,
        layout=layout_to(g.layout),
        protection=protection_to(g.protection),
        ranks=ranks,
        requests=requests,
        parity_bytes=sum(r.parity_bytes for r in requests),
        pool_bytes=g.pool_bytes(),
        parity_budget_bytes=g.budget_bytes,
        uid=g.uid,
        bytes_rebuilt=g.bytes_rebuilt,
        chunks_rebuilt=g.chunks_rebuilt,
    )


def request_ledger(g: group.Group, req: ledger.Request, *, valid: list[bool]) -> pb.RequestLedger:
    """`req`'s ledger entry; `valid[i]` says whether the i-th chunk (in index order) has valid KV."""
    chunks = [req.chunks[i] for i in sorted(req.chunks)]
    return pb.RequestLedger(
        group=g.name,
        request_id=req.request_id,
        token_ids=known_tokens(req, chunk_tokens=g.protection.chunk_tokens).tolist(),
        prompt_tokens=req.prompt_tokens,
        chunk_tokens=g.protection.chunk_tokens,
        chunks=[
            pb.ChunkLedger(
                chunk_index=c.index, slots=c.slots.tolist(), state=enum_value(c.state), kv_valid=ok
            )
            for c, ok in zip(chunks, valid, strict=True)
        ],
        max_new_tokens=req.max_new_tokens,
    )


def known_tokens(req: ledger.Request, *, chunk_tokens: int) -> npt.NDArray[np.int64]:
    """The recorded tokens, or the committed chunks' token ids when those reach further (a rank
    that records tokens less often than it commits, or a ledger restored from the journal)."""
    parts = []
    i = 0
    while i in req.chunks and req.chunks[i].token_ids.size == chunk_tokens:
        parts.append(req.chunks[i].token_ids)
        i += 1
    if i * chunk_tokens > req.tokens.size:
        return np.concatenate(parts)
    return req.tokens


def report_to(name: str, report: recovery.Report) -> pb.RebuildReport:
    return pb.RebuildReport(
        group=name,
        requests=[
            pb.RequestRebuild(
                request_id=r.request_id,
                rebuilt_chunks=r.rebuilt,
                bytes_rebuilt=r.bytes_rebuilt,
                failed_chunks=[pb.FailedChunk(chunk_index=i, reason=enum_value(f)) for i, f in r.failed],
            )
            for r in report.requests
        ],
        bytes_rebuilt=report.bytes_rebuilt,
        seconds=report.seconds,
    )


def plan_to(name: str, plan: planner.GroupPlan) -> pb.RecoveryPlan:
    return pb.RecoveryPlan(
        group=name,
        lost_ranks=list(plan.lost_ranks),
        requests=[
            pb.RequestPlan(
                request_id=p.request_id,
                total_chunks=p.total_chunks,
                recompute_chunks=p.recompute_chunks,
                rebuild_chunks=list(p.rebuild_chunks),
                unprotected_chunks=list(p.unprotected_chunks),
                tail_tokens=p.tail_tokens,
            )
            for p in plan.requests
        ],
        estimated_seconds=plan.estimated_seconds if plan.estimated_seconds < float("inf") else 0.0,
    )


def enum_value(value: int) -> Any:
    """A Python IntEnum as the proto enum value it equals (the stubs type enums as their own classes)."""
    return int(value)
