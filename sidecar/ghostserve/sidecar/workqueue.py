"""A bounded queue of encode jobs run by worker threads (NumPy releases the GIL while it moves bytes).

`submit` never blocks: a full queue refuses the job and the caller counts the chunk as unprotected, so
serving is never slowed down by encoding. `wait_idle` lets tests and the Flush RPC wait for the queue to
drain without sleeping.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(self, *, workers: int, depth: int, name: str = "encode") -> None:
        if workers < 1 or depth < 1:
            raise ValueError(f"workers and depth must be >= 1, got {workers}, {depth}")
        self.depth = depth
        self._jobs: collections.deque[tuple[Hashable, Callable[[], None]]] = collections.deque()
        self._pending: collections.Counter[Hashable] = collections.Counter()  # queued + running, per tag
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, tag: Hashable, job: Callable[[], None]) -> bool:
        """Queue `job` under `tag` (a group). Returns False, queueing nothing, when the queue is full."""
        with self._cond:
            if self._closed or len(self._jobs) >= self.depth:
                return False
            self._jobs.append((tag, job))
            self._pending[tag] += 1
            self._cond.notify_all()
            return True

    def pending(self, tag: Hashable | None = None) -> int:
        """Jobs queued or running (for `tag`, or all)."""
        with self._cond:
            return self._pending[tag] if tag is not None else sum(self._pending.values())

    def wait_idle(self, tag: Hashable | None = None, *, timeout: float) -> bool:
        """Block until no job (of `tag`, or none at all) is queued or running. Returns False on timeout."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while (self._pending[tag] if tag is not None else sum(self._pending.values())) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                tag, job = self._jobs.popleft()
            try:
                job()
            except Exception:  # a failed encode leaves its chunk unprotected; the worker must survive
                log.exception("background job failed")
            finally:
                with self._cond:
                    self._pending[tag] -= 1
                    if self._pending[tag] <= 0:
                        del self._pending[tag]
                    self._cond.notify_all()

    def close(self, *, timeout: float = 10.0) -> None:
        """Drop queued jobs (their chunks stay unprotected), let running ones finish, stop the workers."""
        with self._cond:
            self._closed = True
            while self._jobs:
                tag, _ = self._jobs.popleft()
                self._pending[tag] -= 1
                if self._pending[tag] <= 0:
                    del self._pending[tag]
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
