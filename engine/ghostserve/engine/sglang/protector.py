"""Per-request protection on one rank: commits, token records, releases, and restored requests' pins.

Every call to the sidecar goes through the rank's background sender (sender.CommitSender), so a
forward pass never waits on an RPC; only each chunk's own T tokens travel with it, and rank 0 records
a request's prompt length and budget once, with its first chunk. A rejection from the sidecar never
reaches sglang: that request is served unprotected from then on (warning + metric), or every request
is when the pool itself changed.

Restored requests (resume.py) are pinned in the radix cache. When a client resubmits one under its
own rid (the gateway does), the tracker is seeded so the chunks the ledger already holds are never
committed again; resubmitted under another rid (a superseding request), or never resubmitted within
the grace period, its ledger entry is released and its prefix unpinned. Both happen at forward passes,
which every rank runs in the same order, so every rank's radix cache stays identical.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ghostserve.engine import adapter, sender
from ghostserve.engine.sglang import capture, chunks, metrics, resume

log = logging.getLogger(__name__)


def agreeing_chunks(restored: Sequence[int], tokens: Sequence[int], chunk_tokens: int, limit: int) -> int:
    """How many of the first `limit` chunks have the same tokens in `restored` and `tokens`, counting
    the one `tokens` ends in when it agrees as far as it goes. Pure."""
    n = 0
    while n < limit:
        begin, end = n * chunk_tokens, (n + 1) * chunk_tokens
        have = min(end, len(tokens))
        if have <= begin or list(tokens[begin:have]) != list(restored[begin:have]):
            break
        n += 1
    return n


class Protector:
    def __init__(self, session: adapter.SidecarSession, *, grace_passes: int = 10000) -> None:
        self.session = session
        self.tracker = chunks.ChunkTracker(session.protection.chunk_tokens)
        self.sender = sender.CommitSender(
            session, on_rejected=self._rejected, dropped=lambda rid: rid in self.unprotected
        )
        self.grace_passes = grace_passes
        self.unprotected: dict[str, str] = {}  # rid -> why (written by the sender thread too)
        self.off: str | None = None  # protection off for every request, and why
        self.recorded: set[str] = set()  # rids whose prompt length and budget the ledger holds
        self.pins: dict[str, resume.Pin] = {}
        self._deadline: dict[str, int] = {}
        # rid -> (token count, tokens) the resubmission must still agree with (checked at its next chunk)
        self._verify: dict[str, tuple[int, tuple[int, ...]]] = {}
        # rid -> chunks committed in the request's last pass, checked against req_to_token at its next one
        self._recent: dict[str, list[chunks.Chunk]] = {}
        self.passes = 0
        self.chunks_committed = 0
        self._tree: Any = None
        self._allocator: Any = None

    # -- start-up --------------------------------------------------------------------------------

    def adopt(self, pins: Sequence[resume.Pin], *, tree_cache: Any, allocator: Any) -> None:
        """Take over the pins of the requests restored at scheduler start."""
        self._tree, self._allocator = tree_cache, allocator
        for pin in pins:
            self.pins[pin.record.request_id] = pin
            self._deadline[pin.record.request_id] = self.passes + self.grace_passes
            metrics.RESTORED.inc()

    # -- hooks -------------------------------------------------------------------------------------

    def on_forward(self, batch: Any, req_to_token: Any) -> None:
        """After a forward pass: commit the chunks it completed; release expired pins."""
        self.passes += 1
        if self.off is None:
            self._check_rebound(batch, req_to_token)
            self.chunks_committed += capture.capture_batch(
                batch, tracker=self.tracker, req_to_token=req_to_token, commit=self._commit, skip=self._skip
            )
        if self._deadline and min(self._deadline.values()) < self.passes:
            for rid in [r for r, d in self._deadline.items() if d < self.passes]:
                log.warning("restored request %s was not resubmitted in time; releasing it", rid)
                self._drop_restored(rid)

    def on_release(self, req: Any) -> None:
        """A request finished or was retracted: its ledger entry goes (after this rank's commits)."""
        rid = req.rid
        tracked = self.tracker.forget(rid)
        restored = rid in self.pins
        self.unprotected.pop(rid, None)
        self._verify.pop(rid, None)
        self._recent.pop(rid, None)
        if restored:
            self._unpin(rid)
        if tracked or restored:
            self.recorded.discard(rid)
            self.sender.release(rid)

    def on_flush(self) -> None:
        """sglang flushed its cache (tree and allocator reset): the pinned prefixes are gone from the
        tree and their slots are free, so the ledger entries of the requests still waiting for their
        client are released (their KV is no longer guaranteed)."""
        for rid in list(self.pins):
            self.pins.pop(rid)
            self._deadline.pop(rid, None)
            log.warning("cache flushed: restored request %s is released", rid)
            self.sender.release(rid)

    def turn_off(self, reason: str) -> None:
        """Serve every request unprotected from now on (logged and counted once)."""
        if self.off is None:
            log.error("GhostServe protection is off for every request of this rank: %s", reason)
            metrics.PROTECTION_OFF.inc()
            self.off = reason

    # -- internals ---------------------------------------------------------------------------------

    def _check_rebound(self, batch: Any, req_to_token: Any) -> None:
        """After a pass, sglang may move a request's freshly written tokens onto the radix cache's own
        slots for the same tokens (a prefix the tree already held) and free the request's: a chunk
        committed with the freed slots would restore another request's KV later. Seen at the request's
        next pass; such a request is served unprotected and its entry dropped."""
        for req in batch.reqs:
            recent = self._recent.pop(req.rid, None)
            if not recent or req.rid in self.unprotected:
                continue
            t = self.tracker.chunk_tokens
            row = req.kv.req_pool_idx
            for chunk in recent:
                begin = chunk.index * t
                now = tuple(int(x) for x in req_to_token[row, begin : begin + t].tolist())
                if now != chunk.slots:
                    why = f"sglang moved chunk {chunk.index} to other slots"
                    self._unprotect(req.rid, why, kind="rebound")
                    self.sender.release(req.rid)
                    break

    def _skip(self, req: Any) -> bool:
        rid = req.rid
        if rid not in self.unprotected and rid not in self.tracker:
            self._first_sight(req)
        return rid in self.unprotected

    def _first_sight(self, req: Any) -> None:
        rid = req.rid
        tokens = capture.TokenView(req)
        t = self.tracker.chunk_tokens
        pin = self.pins.get(rid)
        if pin is None:
            self._supersede(tokens)
            return
        # Its client resubmitted it: the ledger holds its first chunks (at the pinned slots), its prompt
        # length and budget. RecordTokens must not overwrite them with the resubmission's.
        self._deadline.pop(rid, None)
        self.recorded.add(rid)
        held = len(pin.record.slots) // t
        agree = agreeing_chunks(pin.record.token_ids, tokens, t, held)
        self.tracker.seed(rid, floor=agree)
        if agree < held:
            self._unprotect(rid, "resubmitted with other tokens than the ledger holds", kind="diverged")
        elif len(tokens) < held * t:
            self._verify[rid] = (held * t, tuple(pin.record.token_ids[: held * t]))

    def _supersede(self, tokens: capture.TokenView) -> None:
        """Release restored requests that this new request continues (a client resubmitted one under a
        new rid): its old entry would otherwise stay in the ledger forever."""
        for old, pin in list(self.pins.items()):
            known = pin.record.token_ids
            if old not in self.tracker and len(tokens) >= len(known) and tokens[: len(known)] == list(known):
                log.info("a new request continues restored request %s; releasing the old entry", old)
                self._drop_restored(old)

    def _commit(self, chunk: chunks.Chunk, req: Any) -> None:
        rid = chunk.request_id
        check = self._verify.get(rid)
        if check is not None and chunk.index * self.tracker.chunk_tokens >= check[0]:
            del self._verify[rid]
            if tuple(capture.TokenView(req)[: check[0]]) != check[1]:
                self._unprotect(rid, "regenerated other tokens than the ledger holds", kind="diverged")
                return
        if rid in self.unprotected:
            return
        if self.session.rank == 0 and rid not in self.recorded:
            self.recorded.add(rid)
            prompt = [int(x) for x in req.origin_input_ids]
            budget = int(getattr(req.sampling_params, "max_new_tokens", 0) or 0)
            self.sender.record(rid, prompt, prompt_tokens=len(prompt), max_new_tokens=budget)
        self.sender.submit(rid, chunk.index, chunk.slots, chunk.token_ids)
        self._recent.setdefault(rid, []).append(chunk)

    def _rejected(self, request_id: str, error: adapter.AdapterError) -> None:
        # Runs on the sender thread: only sets flags the event loop reads.
        if isinstance(error, adapter.PoolChangedError):
            self.turn_off(str(error))
        else:
            self._unprotect(request_id, str(error), kind="rejected")
            # What the ledger holds for it can no longer be trusted: drop it (after what is queued).
            self.sender.release(request_id)

    def _unprotect(self, rid: str, reason: str, *, kind: str) -> None:
        if rid not in self.unprotected:
            log.warning("request %s is served unprotected from now on: %s", rid, reason)
            metrics.UNPROTECTED.labels(reason=kind).inc()
            self.unprotected[rid] = reason

    def _drop_restored(self, rid: str) -> None:
        self._deadline.pop(rid, None)
        self._unpin(rid)
        self.sender.release(rid)

    def _unpin(self, rid: str) -> None:
        pin = self.pins.pop(rid, None)
        if pin is not None:
            resume.release_pin(self._tree, self._allocator, pin)
