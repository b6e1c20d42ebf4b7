"""Sends a rank's chunk commits to the sidecar from a background thread, so a forward step never waits
on the RPC (EngineAdapter.on_chunk_complete "returns at once")."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from ghostserve.engine import adapter


class CommitSender:
    """FIFO of commits drained by one daemon thread. Commits keep their order; ``drain`` waits until
    every queued commit reached the sidecar (or failed) and re-raises the first rejection.

    Commits still queued when the process is SIGKILLed are lost: the engine re-commits every chunk the
    sidecar does not list as committed after a restart (commits are idempotent).
    """

    def __init__(self, session: adapter.SidecarSession) -> None:
        self.session = session
        self._queue: queue.Queue[tuple[str, int, list[int], list[int]]] = queue.Queue()
        self._error: adapter.AdapterError | None = None
        self._thread = threading.Thread(target=self._run, name="gs-commits", daemon=True)
        self._thread.start()

    def submit(
        self, request_id: str, chunk_index: int, slots: Sequence[int], token_ids: Sequence[int]
    ) -> None:
        self._queue.put((request_id, chunk_index, list(slots), list(token_ids)))

    def drain(self) -> None:
        """Block until the queue is empty. Raises the first AdapterError a commit met (then clears it)."""
        self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            rid, c, slots, tokens = self._queue.get()
            try:
                self.session.commit(rid, c, slots, tokens)
            except adapter.AdapterError as exc:
                if self._error is None:
                    self._error = exc
            finally:
                self._queue.task_done()
