"""Waiting for processes to exit, for tests that SIGKILL them (a uniquely named module: conftests clash).

A SIGKILLed process is not gone when the kill returns: it still runs its exit (unmapping a large heap
takes a while on a loaded machine). Each pid's pidfd becomes readable when the process exits (a zombie
waiting for its reaper counts as gone), so `still_running` waits on that event, not a sleep.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable


def still_running(pids: Iterable[int], *, within_s: float = 15.0) -> list[int]:
    """The pids still running after up to `within_s` seconds."""
    deadline = time.monotonic() + within_s
    left = []
    for pid in sorted(pids):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
        if not ready:
            left.append(pid)
    return left
