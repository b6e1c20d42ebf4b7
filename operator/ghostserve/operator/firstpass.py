"""Which deployments' first control-loop passes run, and in what order (the order is pure logic here;
`Gate` only wakes the waiting loops).

A (re)started operator starts one control loop per GhostServeDeployment at once. Every first pass
reads the view, asks the sidecars and may write to the API; run all at once, a thousand of them
compete for the CPU and the API server, and a deployment with a fault waits behind every healthy
one. So first passes are admitted here: an urgent deployment (a recovery recorded in its status, or
a fault in the view) at once, whatever else runs; the others first come, first served, at most
`limit` at a time. A waiting deployment that turns urgent (its GPU fault arrives while it waits)
jumps ahead of every routine one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Protocol

DEFAULT_LIMIT = 4
# A first pass holds its place at most this long: one stuck on an unreachable sidecar (a 10 s call
# timeout) or a slow API must not hold every healthy deployment behind it.
SLOT_SECONDS = 5.0


def waits_for_turn(status: Mapping[str, Any]) -> bool:
    """Whether a loop's first pass goes through the gate at all: not for a deployment no operator has
    reconciled yet (no phase published). Its first pass is its creation, not a re-check of a running
    one; holding a burst of new deployments to `limit` would only slow their start."""
    return bool(status.get("phase"))


def is_urgent(status: Mapping[str, Any], *, faulted: bool) -> bool:
    """A deployment whose first pass must not wait: a recovery in flight (recorded by an earlier
    operator, or the one-pod-per-rank model's single record) or a faulty replica in the view."""
    return faulted or bool(status.get("inFlight")) or bool(status.get("recovery"))


class Admission:
    """First-pass admission: urgent keys at once, routine keys FIFO while fewer than `limit` passes
    run (urgent passes count as running, so they also hold routine ones back)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"first-pass limit must be >= 1, got {limit}")
        self.limit = limit
        # Waiting keys in arrival order (dicts as ordered sets: admission is O(1) per key, not a scan).
        self._urgent: dict[Hashable, None] = {}
        self._routine: dict[Hashable, None] = {}
        self._running: set[Hashable] = set()

    def request(self, key: Hashable, *, urgent: bool) -> None:
        """`key` waits for its first pass (a key already waiting or running is left as it is, except
        that urgency is only ever raised)."""
        if key in self._running:
            return
        if urgent:
            self.promote(key)
            self._urgent.setdefault(key, None)
        elif key not in self._urgent:
            self._routine.setdefault(key, None)

    def promote(self, key: Hashable) -> None:
        """A waiting key turned urgent."""
        if self._routine.pop(key, False) is None:
            self._urgent[key] = None

    def admit(self) -> list[Hashable]:
        """The keys whose first pass may start now (they count as running from here on): every
        urgent waiter, then routine waiters in arrival order while fewer than `limit` run."""
        started = list(self._urgent)
        self._urgent.clear()
        self._running.update(started)
        while self._routine and len(self._running) < self.limit:
            key = next(iter(self._routine))
            del self._routine[key]
            self._running.add(key)
            started.append(key)
        return started

    def finish(self, key: Hashable) -> None:
        """`key`'s first pass ended (or its loop stopped while it waited)."""
        self._urgent.pop(key, None)
        self._routine.pop(key, None)
        self._running.discard(key)

    def waiting(self, *, urgent: bool | None = None) -> int:
        if urgent is None:
            return len(self._urgent) + len(self._routine)
        return len(self._urgent) if urgent else len(self._routine)

    def running(self) -> int:
        return len(self._running)


class Stopped(Protocol):
    """What the gate needs of a stop signal: asyncio.Event, or kopf's DaemonStopped."""

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[Any]: ...


class Gate:
    """The asyncio side of `Admission`: each control loop awaits its turn, re-checking whether it
    became urgent whenever its waker fires (a pod, node or GPU signal for that deployment)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.admission = Admission(limit)
        self._grants: dict[Hashable, asyncio.Event] = {}

    async def turn(
        self, key: Hashable, urgent: Callable[[], bool], waker: asyncio.Event, stopped: Stopped
    ) -> bool:
        """Wait until `key`'s first pass may run; True when admitted as urgent, False as routine.
        Returns early (False) once `stopped` is set; call `done(key)` afterwards in every case."""
        grant = self._grants.setdefault(key, asyncio.Event())
        was_urgent = urgent()
        self.admission.request(key, urgent=was_urgent)
        self._grant()
        while not grant.is_set() and not stopped.is_set():
            waker.clear()
            waits = {asyncio.ensure_future(w) for w in (grant.wait(), waker.wait(), stopped.wait())}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if not grant.is_set() and waker.is_set() and not was_urgent and urgent():
                was_urgent = True
                self.admission.promote(key)
                self._grant()
        return was_urgent and grant.is_set()

    def done(self, key: Hashable) -> None:
        self.admission.finish(key)
        self._grants.pop(key, None)
        self._grant()

    def _grant(self) -> None:
        for key in self.admission.admit():
            self._grants[key].set()
