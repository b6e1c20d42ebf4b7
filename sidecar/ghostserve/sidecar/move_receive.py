"""ReceiveGroup, the target side of MoveGroup: stage the pools of an incoming group, then install it.

Pieces land in fresh shared-memory segments held in a staging area, outside the custodian's groups:
nothing of an incoming group can be attached, described or rebuilt until the commit. A piece is
written only when its xxh3-64 matches and it starts exactly where the staged bytes end; the staging
survives a dropped connection, so the next stream resumes there. The commit checks every pool against
the header's checksums (a mismatch discards the staging: the next move starts over), installs the
group with its ledger, and queues the parity of every chunk again (recomputed here from the moved KV).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import checksums
from ghostserve.sidecar import (
    budget,
    coding,
    commits,
    convert,
    custodian,
    errors,
    group,
    ledger,
    persist,
    pools,
)
from ghostserve.v1 import sidecar_pb2 as pb
from google.protobuf import message as pb_message

log = logging.getLogger("ghostserve.sidecar")

STREAM_WAIT_S = 10.0
STAGING_FILE = "moves-staging.json"  # in the state dir: segments of moves staged here


@dataclasses.dataclass(eq=False)
class Staging:
    header: pb.MoveHeader
    settings: group.Settings
    segments: list[pools.Segment]
    received: int = 0
    # Set while no stream writes into it: a new stream of the same move waits for the old one to end
    # (a dropped connection takes the server a moment to notice) before it resumes.
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def total(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def unlink(self) -> None:
        for s in self.segments:
            s.unlink()
        self.segments = []


def settings_of(header: pb.MoveHeader) -> group.Settings:
    """Raises InvalidArgument for a header the sidecar could not hold as a group."""
    group.check_group_id(header.group)
    settings = group.Settings(
        header.world_size,
        convert.layout_from(header.layout),
        convert.protection_from(header.protection, header.world_size),
    )
    group.check_settings(settings)
    if len(header.pool_checksums) != settings.world_size:
        raise errors.InvalidArgument(
            f"header has {len(header.pool_checksums)} pool checksums for {settings.world_size} ranks"
        )
    if not 1 <= len(header.uid) <= 64:
        raise errors.InvalidArgument("header.uid must be 1-64 characters")
    if len(header.creator) > 256:
        raise errors.InvalidArgument("header.creator longer than 256 characters")
    return settings


class Receiver:
    """Staged incoming groups of one sidecar. Staging state is only touched on the event loop."""

    def __init__(self, c: custodian.Custodian) -> None:
        self.c = c
        self.staged: dict[str, Staging] = {}
        self.bytes_received = 0
        self._record = c.config.state_dir / STAGING_FILE if c.config.state_dir else None
        self._drop_leftovers()

    def _drop_leftovers(self) -> None:
        """Unlink the staging segments a killed predecessor left behind (a staged move does not
        survive a restart: the source resends it from offset 0)."""
        if self._record is None:
            return
        try:
            raw = persist.read_own(self._record)
        except FileNotFoundError:
            return
        try:
            names = json.loads(raw or b"{}").get("segments", [])
        except (ValueError, AttributeError):
            names = []
        prefix = self.c.config.shm_prefix
        for name in names:
            if isinstance(name, str) and name.startswith(prefix) and "/" not in name:
                (pools.SHM_DIR / name).unlink(missing_ok=True)
        self._record.unlink(missing_ok=True)

    def _save(self) -> None:
        """Record the staged segments' names (state dir only), so a restart can free them."""
        if self._record is None:
            return
        names = [seg.name for st in self.staged.values() for seg in st.segments]
        tmp = self._record.with_name(self._record.name + ".tmp")
        tmp.write_text(json.dumps({"segments": names}))
        tmp.replace(self._record)

    def check_attachable(self, name: str) -> None:
        """Raises Unavailable while a group of that id is being moved here."""
        if name in self.staged:
            raise errors.Unavailable(
                f"group {name[:64]!r} is being moved to this node; attach after the move completes"
            )

    def discard(self, name: str) -> bool:
        """Drop a staged move (DeleteGroup, a failed check); True when there was one."""
        st = self.staged.pop(name, None)
        if st is None:
            return False
        st.unlink()
        self._save()
        log.info("move-discarded", extra={"group": name})
        return True

    def close(self) -> None:
        for name in list(self.staged):
            self.discard(name)

    def _installed(self, header: pb.MoveHeader) -> bool:
        """True when the group is installed here already; raises AlreadyExists for another incarnation."""
        with self.c.lock:
            g = self.c.groups.get(header.group)
            if g is None:
                return False
            if g.uid != header.uid:
                raise errors.AlreadyExists(
                    f"this sidecar holds group {header.group!r} of another deployment (uid {g.uid}, "
                    f"the moved group's is {header.uid}); delete it first"
                )
            return True

    async def _begin(self, header: pb.MoveHeader, settings: group.Settings) -> Staging:
        st = self.staged.get(header.group)
        if st is not None and not st.idle.is_set():
            try:
                await asyncio.wait_for(st.idle.wait(), STREAM_WAIT_S)
            except TimeoutError:
                raise errors.FailedPrecondition(
                    f"a move of {header.group!r} is already streaming here"
                ) from None
            st = self.staged.get(header.group)
        if st is not None and st.header != header:
            # Another incarnation, or the source's pools changed: what is staged can never verify.
            self.discard(header.group)
            st = None
        if st is None:
            nbytes = settings.layout.pool_nbytes
            cfg = self.c.config
            # The whole group is one new "pool" here: it must fit the total and per-group quotas.
            budget.check_pool_room(
                nbytes * settings.world_size,
                held_total=self.c.pool_bytes_held() + sum(x.total for x in self.staged.values()),
                held_group=0,
                max_total=cfg.max_pool_bytes,
                max_group=cfg.max_group_pool_bytes,
                headroom=cfg.shm_headroom_bytes,
                shm_dir=pools.SHM_DIR,
            )
            custody = self.c.custody(settings.kind)
            segments: list[pools.Segment] = []
            try:
                for _ in range(settings.world_size):
                    segments.append(custody.create(nbytes))
            except errors.SidecarError:
                for s in segments:
                    s.unlink()
                raise
            st = self.staged[header.group] = Staging(header, settings, segments)
            self._save()
        return st

    def _write(self, st: Staging, piece: pb.MovePiece) -> None:
        data = piece.data
        if piece.offset != st.received:
            raise errors.FailedPrecondition(f"piece at offset {piece.offset}, expected {st.received}")
        if not data or piece.offset + len(data) > st.total:
            raise errors.InvalidArgument(
                f"piece of {len(data)} B at {piece.offset} does not fit the group's {st.total} B"
            )
        if checksums.checksum(data) != piece.checksum:
            raise errors.DataLoss(f"piece at offset {piece.offset} does not match its checksum")
        src = np.frombuffer(data, dtype=np.uint8)
        nbytes = st.segments[0].nbytes
        off, done = piece.offset, 0
        while done < src.size:
            rank, pos = divmod(off, nbytes)
            n = min(src.size - done, nbytes - pos)
            st.segments[rank].array[pos : pos + n] = src[done : done + n]
            off, done = off + n, done + n
        st.received += src.size
        self.bytes_received += src.size

    async def receive(self, pieces: AsyncIterator[pb.MovePiece]) -> pb.ReceiveGroupReply:
        """Serve one ReceiveGroup stream. Raises sidecar errors (nothing valid is left behind)."""
        first = await anext(pieces, None)
        if first is None or not first.HasField("header"):
            raise errors.InvalidArgument("a ReceiveGroup stream starts with the group's header")
        header = first.header
        settings = settings_of(header)
        total = settings.layout.pool_nbytes * settings.world_size
        if self._installed(header):
            self.discard(header.group)
            return pb.ReceiveGroupReply(received_bytes=total, total_bytes=total, complete=True)
        st = await self._begin(header, settings)
        if self._installed(header):  # the stream it waited for installed the group
            self.discard(header.group)
            return pb.ReceiveGroupReply(received_bytes=total, total_bytes=total, complete=True)
        if not st.idle.is_set():
            raise errors.FailedPrecondition(f"a move of {header.group!r} is already streaming here")
        st.idle.clear()
        ledger_parts: list[bytes] = []  # the ledger is sent whole by every stream that commits
        ledger_bytes = 0
        try:
            async for piece in pieces:
                if self.staged.get(header.group) is not st:
                    raise errors.Unavailable(f"the move of {header.group!r} was cancelled here")
                if piece.HasField("header"):
                    raise errors.InvalidArgument("a stream carries one header, first")
                if piece.ledger or piece.commit:
                    if piece.data:
                        raise errors.InvalidArgument("a piece carries pool data or ledger, not both")
                    ledger_parts.append(piece.ledger)
                    ledger_bytes += len(piece.ledger)
                    if ledger_bytes > self.c.store.budget:
                        raise errors.ResourceExhausted(
                            f"the moved ledger ({ledger_bytes} B so far) exceeds the memory budget"
                        )
                    if piece.commit:
                        await self._commit(st, b"".join(ledger_parts), piece.ledger_checksum)
                        return pb.ReceiveGroupReply(received_bytes=total, total_bytes=total, complete=True)
                    continue
                if ledger_parts:
                    raise errors.InvalidArgument("pool pieces come before the ledger")
                self._write(st, piece)
            return pb.ReceiveGroupReply(received_bytes=st.received, total_bytes=total)
        finally:
            st.idle.set()

    async def _commit(self, st: Staging, ledger_blob: bytes, ledger_checksum: int) -> None:
        name = st.header.group
        if st.received != st.total:
            raise errors.FailedPrecondition(f"commit after {st.received} of {st.total} pool bytes")
        if checksums.checksum(ledger_blob) != ledger_checksum:
            raise errors.DataLoss("the moved ledger does not match its checksum")
        moved = pb.MovedLedger()
        try:
            moved.ParseFromString(ledger_blob)
        except pb_message.DecodeError as exc:
            raise errors.InvalidArgument(f"undecodable moved ledger: {exc}") from exc
        arrays = [s.array for s in st.segments]
        sums = await asyncio.to_thread(lambda: [checksums.checksum(a) for a in arrays])
        if self.staged.get(name) is not st:
            raise errors.Unavailable(f"the move of {name!r} was cancelled here")
        bad = [r for r, (a, b) in enumerate(zip(sums, st.header.pool_checksums, strict=True)) if a != b]
        if bad:
            self.discard(name)
            raise errors.DataLoss(f"moved pools of ranks {bad} do not match the source's checksums")
        try:
            self._install(st, moved)
        except errors.SidecarError:
            self.discard(name)
            raise
        self.staged.pop(name, None)
        self._save()

    def _install(self, st: Staging, moved: pb.MovedLedger) -> None:
        """Build the group from the staged pools and the ledger, make it visible, queue its parity."""
        c, h, settings = self.c, st.header, st.settings
        try:
            codec = coding.make_codec(settings.protection, settings.world_size)
        except Exception as exc:
            raise errors.InvalidArgument(f"code settings rejected: {exc}") from exc
        g = group.Group(h.group, settings, codec=codec, uid=h.uid, creator=h.creator)
        g.budget_bytes = h.parity_budget_bytes
        for rp, seg in zip(g.ranks, st.segments, strict=True):
            rp.segment = seg
        complete = _fill_ledger(g, moved)
        cost = sum(commits.request_cost(r) for r in g.ledger.requests.values())
        with g.lock:
            with c.lock:
                if c.groups.get(h.group) is not None:
                    raise errors.AlreadyExists(f"group {h.group!r} appeared here during the move")
                # The ledger's memory counts in the budget like a commit's (refused: nothing installed).
                c.store.charge(cost, tokens_of=c.tokens_of, on_evict=c.on_evict)
                c.groups[h.group] = g
            if c.journal:
                for rid, chunk in complete:
                    commits.journal_append(c, g, commits.chunk_record(rid, chunk))
            c.save_state()
            c.metrics.pool_bytes.inc(g.pool_bytes())
            for rid, chunk in complete:
                # A full budget leaves the chunk unprotected (the custodian records why); the KV moved.
                with contextlib.suppress(errors.ResourceExhausted):
                    commits.protect(c, g, rid, chunk)
        log.info(
            "group-received",
            extra={
                "group": h.group,
                "from": h.source_node,
                "bytes": st.total,
                "requests": len(moved.requests),
                "chunks": len(complete),
            },
        )


def _fill_ledger(g: group.Group, moved: pb.MovedLedger) -> list[tuple[str, ledger.Chunk]]:
    """Replay the moved ledger into `g` (every rank commits every chunk). Raises InvalidArgument."""
    complete: list[tuple[str, ledger.Chunk]] = []
    for req in moved.requests:
        for ch in req.chunks:
            slots = np.asarray(ch.slots, dtype=np.int64)
            tokens: npt.NDArray[np.int64] = np.asarray(ch.token_ids, dtype=np.int64)
            for rank in range(g.settings.world_size):
                chunk, done = g.ledger.commit(
                    rank, req.request_id, ch.chunk_index, slots=slots, token_ids=tokens
                )
            if done:
                complete.append((req.request_id, chunk))
        if req.token_ids or req.prompt_tokens:
            g.ledger.record_tokens(
                req.request_id,
                np.asarray(req.token_ids, dtype=np.int64),
                prompt_tokens=req.prompt_tokens,
                max_new_tokens=req.max_new_tokens,
            )
    return complete
