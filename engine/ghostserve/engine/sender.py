"""A rank's background sender of sidecar calls (chunk commits, token records, releases), shared by both
engines, so a forward pass never waits on an RPC (EngineAdapter.on_chunk_complete "returns at once")."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ghostserve.engine import adapter

log = logging.getLogger(__name__)

# Chunks sent in one CommitChunks call at most: 64 chunks of T=256 are ~200 KB on the wire, far below
# the sidecar's 4 MiB message limit, and enough that a prefill of 16k tokens is one call.
MAX_BATCH = 64
# Commits kept to send again while the sidecar is unreachable (a restart takes seconds): 2 x T ids each,
# ~4 KB at T=256, so at most ~16 MB per rank. Beyond it the oldest are given up (left unprotected).
MAX_PARKED = 4096
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # waits between tries of the parked commits


@dataclasses.dataclass(frozen=True)
class _Call:
    kind: str  # "commit" | "record" | "release"
    request_id: str
    chunk_index: int = 0
    slots: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0
    max_new_tokens: int = 0


class CommitSender:
    """One daemon thread sends a rank's sidecar calls in the order they were queued.

    The order is kept per rank: a request's release follows its commits, so once every rank's release
    arrived no late commit can re-create the entry. Commits queued back to back (a prefill, a decode
    step that completed chunks of many requests, or a sidecar slower than the engine) go in one
    CommitChunks call of up to MAX_BATCH chunks: one RPC per forward pass instead of one per chunk.
    A rejection (AdapterError) goes to `on_rejected(request_id, error)` when given (the engine then
    serves that request unprotected); otherwise `drain` re-raises the first one.

    A commit, token record or release that finds the sidecar unreachable (restarting, slow) is parked
    and sent again, with the next calls or after a backoff, until it gets through, its request is
    released or dropped, or MAX_PARKED newer ones pushed it out (a request's newest record replaces
    its parked one: a record carries the whole token list). The sidecar forgets a lost rank's commits
    of chunks that still wait for other ranks, so a late commit never completes a chunk over KV that
    is gone. Calls still queued or parked when the process is SIGKILLed are lost: chunks the sidecar
    does not list as committed are recomputed after a restart.
    """

    def __init__(
        self,
        session: adapter.SidecarSession,
        *,
        on_rejected: Callable[[str, adapter.AdapterError], None] | None = None,
        dropped: Callable[[str], bool] = lambda request_id: False,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.session = session
        self._on_rejected = on_rejected
        # Commits and records of requests for which `dropped` holds are skipped (their releases are not).
        self._dropped = dropped
        self._max_batch = max_batch
        self._queue: queue.Queue[_Call] = queue.Queue()
        self._error: adapter.AdapterError | None = None
        self.rejected = 0
        self.batches = 0  # CommitChunks calls made (commits per call = session.commits_sent / batches)
        self._parked: dict[tuple[str, int], _Call] = {}  # sender thread only
        self._parked_records: dict[str, _Call] = {}  # the newest record per request, in order
        self._parked_releases: dict[str, None] = {}  # releases that met an unreachable sidecar, in order
        self._tries = 0  # failed tries of the parked commits in a row (picks the backoff)
        self.resent = 0  # parked commits that got through
        self.given_up = 0  # parked commits pushed out by newer ones
        self._thread = threading.Thread(target=self._run, name="gs-commits", daemon=True)
        self._thread.start()

    def submit(
        self, request_id: str, chunk_index: int, slots: Sequence[int], token_ids: Sequence[int]
    ) -> None:
        """Queue the commit of one chunk (its T slots and T token ids)."""
        self._queue.put(_Call("commit", request_id, chunk_index, tuple(slots), tuple(token_ids)))

    def record(
        self, request_id: str, tokens: Sequence[int], *, prompt_tokens: int, max_new_tokens: int = 0
    ) -> None:
        """Queue RecordTokens (a request's prompt length and budget for resume; sent once per request)."""
        self._queue.put(
            _Call(
                "record",
                request_id,
                token_ids=tuple(tokens),
                prompt_tokens=prompt_tokens,
                max_new_tokens=max_new_tokens,
            )
        )

    def release(self, request_id: str) -> None:
        """Queue the release of a finished request (after its commits)."""
        self._queue.put(_Call("release", request_id))

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def parked(self) -> int:
        """Commits, records and releases waiting for an unreachable sidecar (a snapshot: the sender
        thread changes it)."""
        return len(self._parked) + len(self._parked_records) + len(self._parked_releases)

    def drain(self) -> None:
        """Block until every queued call was sent (or failed). Raises the first AdapterError a call met
        when there is no `on_rejected` callback (then clears it)."""
        self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        held: _Call | None = None  # the call after a batch of commits: sent next, in order
        while True:
            if held is not None:
                first, held = held, None
            elif self.parked():
                try:
                    first = self._queue.get(timeout=RETRY_S[min(self._tries, len(RETRY_S) - 1)])
                except queue.Empty:
                    self._commit([])  # nothing new: try the parked commits again
                    continue
            else:
                first = self._queue.get()
            calls = [first]
            if first.kind == "commit":
                while len(calls) < self._max_batch:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt.kind != "commit":
                        held = nxt
                        break
                    calls.append(nxt)
            try:
                self._send(calls)
            finally:
                for _ in calls:
                    self._queue.task_done()

    def _send(self, calls: list[_Call]) -> None:
        try:
            if calls[0].kind == "commit":
                self._commit(calls)
                return
            call, s = calls[0], self.session
            if call.kind == "release":  # a finished request's commits are not worth sending any more
                self._parked = {k: v for k, v in self._parked.items() if k[0] != call.request_id}
                self._parked_records.pop(call.request_id, None)
                self._parked_releases.pop(call.request_id, None)
                if s.try_release(call.request_id) is None:
                    self._keep(self._parked_releases, call.request_id, None)
                return
            if self._dropped(call.request_id):
                return
            if call.kind == "record":
                self._parked_records.pop(call.request_id, None)  # this one is newer
                self._parked_releases.pop(call.request_id, None)  # recorded again: not finished
                if self._record(call) is adapter.Sent.UNREACHABLE:
                    self._keep(self._parked_records, call.request_id, call)
        except adapter.AdapterError as exc:
            for rid in dict.fromkeys(c.request_id for c in calls):
                self._reject(rid, exc)
        except Exception as exc:  # never let the sender die: every later commit would queue forever
            log.exception("sidecar call %s of %s failed", calls[0].kind, calls[0].request_id)
            for rid in dict.fromkeys(c.request_id for c in calls):
                self._reject(rid, adapter.AdapterError(f"{calls[0].kind} of {rid!r} failed: {exc}"))

    def _commit(self, calls: list[_Call]) -> None:
        """Send `calls` after the parked commits (oldest first), in batches of at most max_batch. A parked
        commit stays parked (and counted by `parked`) until it got through or was given up."""
        for key in [k for k in self._parked if self._dropped(k[0])]:
            del self._parked[key]
        live = list(self._parked.values()) + [c for c in calls if not self._dropped(c.request_id)]
        for c in calls:  # a request committing again (resubmitted under its rid) is not finished
            self._parked_releases.pop(c.request_id, None)
        try:
            for i in range(0, len(live), self._max_batch):
                self._commit_batch(live[i : i + self._max_batch])
            for rid, call in list(self._parked_records.items()):
                if self._dropped(rid):
                    del self._parked_records[rid]
                    continue
                if self._record(call) is adapter.Sent.UNREACHABLE:
                    break
                del self._parked_records[rid]
                self.resent += 1
            for rid in list(self._parked_releases):
                if self.session.try_release(rid) is None:
                    break  # still unreachable: the rest wait for the next try
                del self._parked_releases[rid]
                self.resent += 1
        except adapter.AdapterError:
            # The rank's pool changed (its KV is gone): _send rejects the requests of `calls`, and
            # the parked commits describe KV that is not there any more.
            self._parked.clear()
            raise

    def _commit_batch(self, live: list[_Call]) -> None:
        outcomes = self.session.commit_many(
            [adapter.ChunkCommit(c.request_id, c.chunk_index, c.slots, c.token_ids) for c in live]
        )
        self.batches += 1
        rejected: dict[str, adapter.AdapterError] = {}
        reached = False
        for c, outcome in zip(live, outcomes, strict=True):
            key = (c.request_id, c.chunk_index)
            if outcome is adapter.Sent.UNREACHABLE:
                self._park(c)
                continue
            reached = True
            if self._parked.pop(key, None) is not None:
                self.resent += 1
            if isinstance(outcome, adapter.AdapterError):
                rejected.setdefault(c.request_id, outcome)
        self._tries = 0 if reached else self._tries + 1
        for rid, exc in rejected.items():  # once per request: the engine drops its protection once
            self._reject(rid, exc)

    def _record(self, call: _Call) -> adapter.Sent:
        return self.session.try_record_tokens(
            call.request_id,
            call.token_ids,
            prompt_tokens=call.prompt_tokens,
            max_new_tokens=call.max_new_tokens,
        )

    def _park(self, call: _Call) -> None:
        self._keep(self._parked, (call.request_id, call.chunk_index), call)

    def _keep(self, parked: dict[Any, Any], key: Any, value: Any) -> None:
        """Park `value` under `key`; beyond MAX_PARKED the oldest entries of `parked` are given up."""
        parked[key] = value
        while len(parked) > MAX_PARKED:
            del parked[next(iter(parked))]
            self.given_up += 1

    def _reject(self, request_id: str, exc: adapter.AdapterError) -> None:
        self.rejected += 1
        if self._on_rejected is not None:
            self._on_rejected(request_id, exc)
        elif self._error is None:
            self._error = exc
