"""Telling the sidecar that ranks are gone when sglang's process tree goes down.

sglang 0.5.23 restarts nothing by itself: when any scheduler process dies (killed, crashed, or a
survivor's EXIT_PEER_FAULT), the launcher's SubprocessWatchdog SIGQUITs the launcher, whose handler
calls `kill_process_tree` on the whole tree; a normal shutdown ends in the same call. NCCL communicators
cannot be re-formed inside a running scheduler, so the process tree (the pod's container) is the unit
of restart, and the plugin makes that explicit instead of fighting it: the launcher, which outlives a
rank's SIGKILL, detaches every rank of its group before the tree is killed, so the sidecar's
DescribeGroup stops listing dead workers as attached. The restarted tree re-attaches the same pools.
A SIGKILL of the launcher itself leaves no one to tell; the next Attach of each rank replaces its entry.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

import grpc
from ghostserve.engine.sglang import settings as settings_mod
from ghostserve.sidecar import client as client_mod

log = logging.getLogger(__name__)

DETACH_TIMEOUT = 2.0  # seconds per call: the tree is going down either way


def is_launcher() -> bool:
    """True in sglang's top process (the launcher), False in the scheduler processes it spawned."""
    return multiprocessing.parent_process() is None


def detach_group(settings: settings_mod.PluginSettings) -> list[int]:
    """Detach every rank of the group that the sidecar lists as attached; returns those ranks.

    Never raises: a sidecar that cannot be reached is logged (the tree is exiting)."""
    detached: list[int] = []
    try:
        with client_mod.SidecarClient(settings.sidecar, timeout=DETACH_TIMEOUT) as client:
            desc = client.describe_group(group=settings.group)
            for state in desc.ranks:
                if state.attached:
                    client.detach(group=settings.group, rank=state.rank)
                    detached.append(state.rank)
    except grpc.RpcError as exc:
        log.warning("could not detach the ranks of %s from the sidecar: %s", settings.group, exc.code())
        return detached
    if detached:
        log.info("detached ranks %s of %s from the sidecar (process tree exiting)", detached, settings.group)
    return detached


def around_kill_tree(
    original: Callable[..., Any],
    *args: Any,
    settings: settings_mod.PluginSettings,
    detach_own: Callable[[], None],
    **kwargs: Any,
) -> Any:
    """AROUND sglang's kill_process_tree: when it kills this process's own tree, detach first (the
    launcher: every rank; a scheduler: its own)."""
    target = args[0] if args else kwargs.get("parent_pid")
    try:
        if target not in (None, os.getpid()):
            pass  # a helper process's tree, not ours
        elif is_launcher():
            detach_group(settings)
        else:
            detach_own()
    except Exception:  # never keep sglang from cleaning up its tree
        log.exception("detach before kill_process_tree failed")
    return original(*args, **kwargs)
