"""Starts, talks to and tears down the rank processes of one tensor-parallel group.

Fault model: when any rank dies, gloo collectives on the survivors fail or hang, so the cluster kills
*every* rank (SIGKILL) and the engine starts a fresh generation of processes with a fresh gloo store.
Nothing is lost by that: the KV pools live in the sidecar, and ranks hold no other state the driver
cannot resend. Only a device fault (MarkLost) takes a pool's content with it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import signal
import time
import typing
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

from ghostserve.engine.reference import rank as rank_mod

_CTX = multiprocessing.get_context("forkserver")
# The fork server imports torch once; every rank (and every restart) forks from it in milliseconds.
_CTX.set_forkserver_preload(["torch", "torch.distributed", "ghostserve.engine.reference.rank"])


class RankFault(RuntimeError):
    """One or more rank processes died (or closed their pipe) while the driver waited on them."""

    def __init__(self, ranks: Sequence[int], exitcodes: dict[int, int] | None = None) -> None:
        super().__init__(f"rank(s) {list(ranks)} died")
        self.ranks = list(ranks)
        # Exit status of every rank of the generation after it was torn down (-9: killed by us or
        # SIGKILLed); a rank whose GPU died exits with devices.EXIT_DEVICE_ERROR.
        self.exitcodes = dict(exitcodes or {})


class RankError(RuntimeError):
    """A rank rejected a message (bad input); the ranks are still alive."""


class Cluster:
    """One generation of rank processes. Mutates only its processes and pipes."""

    def __init__(self, specs: Sequence[rank_mod.RankSpec], *, start_timeout_s: float = 120.0) -> None:
        self.specs = list(specs)
        self.start_timeout_s = start_timeout_s
        self.procs: list[BaseProcess] = []
        self.conns: list[multiprocessing.connection.Connection] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def start(self) -> list[bool]:
        """Start every rank and wait until each attached; returns needs_rebuild per rank.

        Raises RankFault if a rank dies while starting (the others are killed).
        """
        for spec in self.specs:
            pathlib.Path(spec.store_path).unlink(missing_ok=True)
        for spec in self.specs:
            parent, child = _CTX.Pipe()
            proc = _CTX.Process(
                target=rank_mod.main, args=(spec, child), name=f"gs-rank{spec.rank}", daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        replies = self._collect(deadline=time.monotonic() + self.start_timeout_s)
        return [bool(r[1]) for r in replies]

    def broadcast(self, msg: object) -> None:
        """Send the same message to every rank. Raises RankFault if a pipe is already broken."""
        self.send([msg] * len(self.conns))

    def send(self, msgs: Sequence[object]) -> None:
        dead = []
        for i, (conn, msg) in enumerate(zip(self.conns, msgs, strict=True)):
            try:
                conn.send(msg)
            except (BrokenPipeError, ConnectionResetError, OSError):
                dead.append(i)
        if dead:
            raise RankFault(dead, self.kill_all())

    def collect(self, *, timeout_s: float = 600.0) -> list[Any]:
        """One reply payload per rank. Raises RankFault (after killing every rank) if one dies."""
        replies = self._collect(deadline=time.monotonic() + timeout_s)
        errors = [r[1] for r in replies if r[0] == "error"]
        if errors:
            raise RankError(errors[0])
        return [r[1] for r in replies]

    def call(self, msg: object, *, timeout_s: float = 600.0) -> list[Any]:
        self.broadcast(msg)
        return self.collect(timeout_s=timeout_s)

    def _collect(self, *, deadline: float) -> list[tuple[str, Any]]:
        replies: dict[int, tuple[str, Any]] = {}
        by_conn = {id(c): i for i, c in enumerate(self.conns)}
        by_sentinel = {p.sentinel: i for i, p in enumerate(self.procs)}
        while len(replies) < len(self.conns):
            pending: list[Any] = [c for i, c in enumerate(self.conns) if i not in replies]
            pending += [p.sentinel for i, p in enumerate(self.procs) if i not in replies]
            left = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(pending, timeout=max(0.0, left))
            if not ready:
                missing = [i for i in range(len(self.conns)) if i not in replies]
                raise RankFault(missing, self.kill_all())
            dead = []
            for obj in ready:
                if isinstance(obj, int):
                    dead.append(by_sentinel[obj])
                    continue
                conn = typing.cast(multiprocessing.connection.Connection, obj)
                i = by_conn[id(conn)]
                try:
                    replies[i] = conn.recv()
                except (EOFError, ConnectionResetError, OSError):
                    dead.append(i)
            if dead:
                raise RankFault(sorted(set(dead)), self.kill_all())
        return [replies[i] for i in range(len(self.conns))]

    def kill(self, rank: int) -> None:
        """SIGKILL one rank (fault injection)."""
        pid = self.procs[rank].pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> dict[int, int]:
        """SIGKILL every rank still alive and reap them all; returns each rank's exit status."""
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                # A survivor may exit on its own (gloo error) between the check and the kill.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        return self._reap()

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Ask every rank to exit; kill the ones that do not within the timeout."""
        try:
            self.broadcast(rank_mod.Stop())
            self._collect(deadline=time.monotonic() + timeout_s)
        except RankFault:
            pass
        for p in self.procs:
            p.join(timeout_s)
        self.kill_all()

    def _reap(self) -> dict[int, int]:
        for p in self.procs:
            p.join()
        codes = {i: p.exitcode for i, p in enumerate(self.procs) if p.exitcode is not None}
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []
        return codes
