"""Local process trees: what a container, a node's sidecar or the operator is in the embedded cluster.

Each runs in its own session (process group), with SIGKILL as its parent-death signal (util-linux
`setpriv --pdeathsig`, where installed: Python code between fork and exec can deadlock in a threaded
parent) so nothing outlives a crashed cluster process; stopping one signals the whole tree (the
group plus every descendant found in /proc, for children that made their own session). Exit is
awaited through a pidfd, without a thread per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence

_SETPRIV = shutil.which("setpriv")


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc; racy by nature, callers signal the group too)."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Process:
    """One process tree. `start` launches it; `wait` returns its exit status (negative: killed by signal)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: pathlib.Path,
        log: pathlib.Path,
    ) -> None:
        self.argv, self.env, self.cwd, self.log = list(argv), dict(env), cwd, log
        self.proc: subprocess.Popen[bytes] | None = None
        self._exited: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> int:
        """Launch; returns the pid. Raises OSError when the program cannot be started."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            prefix = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []
            self.proc = subprocess.Popen(
                [*prefix, *self.argv],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        fd = os.pidfd_open(self.proc.pid)

        def reap() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            assert self.proc is not None and self._exited is not None
            code = self.proc.wait()
            if not self._exited.done():
                self._exited.set_result(code)

        loop.add_reader(fd, reap)
        return self.proc.pid

    async def wait(self) -> int:
        assert self._exited is not None, "not started"
        return await asyncio.shield(self._exited)

    @property
    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    def signal_tree(self, sig: int) -> None:
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the tree, SIGKILL it after `grace` seconds (0: at once); returns the exit status."""
        if self.proc is None or self._exited is None:
            return None
        if self.running and grace > 0:
            self.signal_tree(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), grace)
        # The leader may be gone while children it started still run: kill whatever is left.
        self.signal_tree(signal.SIGKILL)
        return await self.wait()
