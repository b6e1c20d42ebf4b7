"""A surviving rank's reaction to a peer's failure, replacing sglang's kill-the-tree.

sglang 0.5.23: when a scheduler's event loop raises, `run_scheduler_process` logs it and sends SIGQUIT
to its parent, whose handler kills the whole process tree. With GhostServe the rank's KV lives in the
sidecar, so a survivor has nothing to save; what matters is to leave promptly, say why, and not take
unrelated processes with it. The plugin wraps `Scheduler.run_event_loop` (an AROUND hook): a failure
that comes from the collective layer (a peer died) detaches the rank from the sidecar, which keeps the
pool, and exits the process with EXIT_PEER_FAULT; anything else keeps sglang's behaviour.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch.distributed
from ghostserve.engine.sglang import settings as settings_mod

log = logging.getLogger(__name__)

# EX_TEMPFAIL: the operator reads it as "a peer failed, restart me and re-attach my pool".
EXIT_PEER_FAULT = 75

# Messages of collective-layer errors that mean the other side went away.
_PEER_MARKERS = (
    "nccl",
    "gloo",
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "processgroup",
    "watchdog caught collective operation timeout",
    "socket timeout",
)


def is_peer_fault(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from) says a peer rank failed. Pure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.distributed.DistError):
            return True
        text = str(current).lower()
        if any(marker in text for marker in _PEER_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def react(
    exc: BaseException,
    *,
    policy: settings_mod.SurvivorPolicy,
    detach: Callable[[], None],
    exit_process: Callable[[int], NoReturn] = os._exit,
) -> None:
    """Decide what a failed event loop does. Returns only when sglang's own handling should go on.

    With DETACH_EXIT and a peer fault: calls `detach` (errors are logged, not raised: the pool is in
    custody either way), flushes logs and calls `exit_process(EXIT_PEER_FAULT)`, which skips sglang's
    SIGQUIT to the parent. With policy SGLANG or any other failure: returns, and the caller re-raises.
    """
    if policy is not settings_mod.SurvivorPolicy.DETACH_EXIT or not is_peer_fault(exc):
        return
    log.error("peer rank failure (%s: %s); detaching from the sidecar and exiting", type(exc).__name__, exc)
    try:
        detach()
    except Exception:
        log.exception("detach from the sidecar failed; the pool stays in its custody regardless")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    exit_process(EXIT_PEER_FAULT)


def guard_event_loop(
    original: Callable[..., Any],
    scheduler: Any,
    *args: Any,
    policy: Callable[[], settings_mod.SurvivorPolicy],
    detach: Callable[[], None],
    **kwargs: Any,
) -> Any:
    """Run sglang's event loop; on failure apply `react` and re-raise if it returns."""
    try:
        return original(scheduler, *args, **kwargs)
    except Exception as exc:
        react(exc, policy=policy(), detach=detach)
        raise
