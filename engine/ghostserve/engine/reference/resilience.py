"""The driver's recover-and-retry scope: every operation that talks to the ranks runs inside it.

A rank fault at any point (a forward step, finishing a request, a replay, a recovery itself) starts
recovery over; a sidecar that is down (raw gRPC UNAVAILABLE/DEADLINE_EXCEEDED from an RPC the driver
makes) is waited for, with a bound, and recovery starts over once it answers. Nothing here gives up
while faults keep being recoverable; only a fault that repeats on the same operation more often than
``Options.max_attempts`` (a bug, not a fault) or a sidecar down for longer than
``Options.sidecar_wait_s`` ends serving.

A rank that exits with ``devices.EXIT_DEVICE_ERROR`` lost its GPU: it cannot be restarted in place
(the process tree must be rescheduled without that GPU), so that is raised as ``DeviceLost``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc
from ghostserve.engine.reference import cluster as cluster_mod
from ghostserve.engine.reference import devices, driver, recovery
from ghostserve.sidecar import client as client_mod

T = TypeVar("T")

_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Unrecoverable(RuntimeError):
    """Serving cannot go on in this process tree (repeated faults of one operation, sidecar gone)."""


class DeviceLost(Unrecoverable):
    """A rank's GPU took a fatal fault: the process tree must be rescheduled without that GPU."""

    def __init__(self, ranks: Iterable[int]) -> None:
        self.ranks = sorted(set(ranks))
        super().__init__(f"rank(s) {self.ranks} lost their GPU (device fault)")


def is_transient(exc: BaseException) -> bool:
    """A gRPC error that means "the sidecar is restarting or slow", not "the sidecar refused"."""
    return isinstance(exc, grpc.RpcError) and exc.code() in _TRANSIENT


def guarded(engine: driver.Driver, op: Callable[[], T], *, what: str) -> T:
    """Run ``op`` (which talks to the ranks and/or the sidecar); on a rank fault recover and run it again.

    ``op`` must be safe to redo after a recovery (forward steps rewrite identical KV; Digest/Drop/
    Commit are idempotent). Raises Unrecoverable (DeviceLost for a lost GPU)."""
    attempts = 0
    while True:
        try:
            return op()
        except cluster_mod.RankFault as fault:
            attempts += 1
            if attempts > engine.opts.max_attempts:
                raise Unrecoverable(f"{what} failed {attempts} times in a row") from fault
            _check_device(fault)
            recover(engine, fault.ranks)
        except grpc.RpcError as exc:
            if not is_transient(exc):
                raise
            attempts += 1
            if attempts > engine.opts.max_attempts:
                raise Unrecoverable(f"{what}: sidecar unavailable {attempts} times in a row") from exc
            wait_for_sidecar(engine)


def recover(engine: driver.Driver, dead: Iterable[int]) -> None:
    """Recover from the death of ranks ``dead``; a fault or sidecar outage during the recovery starts
    it over (the ranks it restarted are killed again, the lost ranks stay lost until a recovery
    completes: ``engine.pending_lost``). Appends one report per completed recovery."""
    dead_set = set(dead)
    attempts = 0
    while True:
        try:
            report = recovery.recover(engine, sorted(dead_set))
        except cluster_mod.RankFault as fault:
            _check_device(fault)
            dead_set |= set(fault.ranks)
            attempts += 1
            engine.counters.recovery_restarts += 1
            if attempts > engine.opts.max_attempts:
                raise Unrecoverable(f"recovery failed {attempts} times in a row") from fault
            continue
        except grpc.RpcError as exc:
            if not is_transient(exc):
                raise
            attempts += 1
            engine.counters.recovery_restarts += 1
            if attempts > engine.opts.max_attempts:
                raise Unrecoverable(f"recovery: sidecar unavailable {attempts} times") from exc
            wait_for_sidecar(engine)
            continue
        engine.recoveries.append(report)
        engine.last_recovery_end = time.perf_counter()
        if engine.on_recovered:
            engine.on_recovered(report)
        return


def wait_for_sidecar(engine: driver.Driver) -> None:
    """Wait (at most ``opts.sidecar_wait_s``) until the sidecar answers, on fresh channels: a channel
    whose peer vanished waits out gRPC's reconnect backoff (seconds) after the sidecar is back."""
    deadline = time.monotonic() + engine.opts.sidecar_wait_s
    delay = 0.05
    while True:
        fresh = client_mod.SidecarClient(engine.sidecar, timeout=engine.client.timeout)
        try:
            fresh.health(timeout=1.0)
        except grpc.RpcError:
            fresh.close()
            if time.monotonic() > deadline:
                raise Unrecoverable(
                    f"sidecar {engine.sidecar} unreachable for {engine.opts.sidecar_wait_s:.0f}s"
                ) from None
            time.sleep(delay)
            delay = min(1.0, delay * 2)
            continue
        engine.replace_client(fresh)
        return


def _check_device(fault: cluster_mod.RankFault) -> None:
    lost = [r for r, code in fault.exitcodes.items() if code == devices.EXIT_DEVICE_ERROR]
    if lost:
        raise DeviceLost(lost) from fault
