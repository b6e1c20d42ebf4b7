"""Unix peer credentials for a gRPC server that cannot see them.

gRPC Python does not expose SO_PEERCRED. `UnixFront` therefore serves the public socket itself: for each
connection it reads the peer's uid (SO_PEERCRED, set by the kernel, unforgeable), then relays the bytes
to the gRPC server's socket in a private 0700 directory from a client socket bound at `u<uid>-<n>` in
that directory. The server sees that path as `context.peer()`; only this process can create names in
the directory, so `uid_of(peer)` is as trustworthy as SO_PEERCRED itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pathlib
import re
import shutil
import socket
import struct
import tempfile

log = logging.getLogger("ghostserve.sidecar")

MAX_CONNECTIONS = 4096
_BUF = 1 << 18
_PEER = re.compile(r"^unix:(?P<dir>.+)/u(?P<uid>\d+)-[0-9a-z]+$")


def private_dir(public: pathlib.Path) -> pathlib.Path:
    """Where the inner socket and the relay names live: beside the public socket when the paths fit a
    sockaddr_un (108 bytes), else a fresh directory under the system temp dir."""
    d = public.parent / f".{public.name}.i"
    if len(str(d)) + 20 > 100:
        return pathlib.Path(tempfile.mkdtemp(prefix="gs-sc-"))
    shutil.rmtree(d, ignore_errors=True)  # a crashed sidecar's
    d.mkdir(mode=0o700)
    return d


def uid_of(peer: str, directory: pathlib.Path) -> int | None:
    """The uid a relayed connection came from, or None when `peer` is not one of our relay names."""
    m = _PEER.match(peer)
    if m is None or m.group("dir") != str(directory):
        return None
    return int(m.group("uid"))


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_BUF):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


class UnixFront:
    """The public Unix socket of a sidecar, relayed to `inner` with the caller's uid in the peer name."""

    def __init__(self, public: pathlib.Path, directory: pathlib.Path) -> None:
        self.public = public
        self.dir = directory
        self.inner = directory / "s"
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._names = itertools.count()

    @property
    def inner_address(self) -> str:
        return f"unix://{self.inner}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.public))
        os.chmod(self.public, 0o660)

    def stop_accepting(self) -> None:
        """New connections are refused; relays in flight go on (graceful shutdown)."""
        if self._server is not None:
            self._server.close()
        self.public.unlink(missing_ok=True)

    async def stop(self) -> None:
        self.stop_accepting()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.public.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._tasks) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._tasks.add(task)
        name = self.dir / f"u0-x{next(self._names):x}"
        out: asyncio.StreamWriter | None = None
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            name = self.dir / f"u{uid}-{next(self._names):x}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(name))
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, str(self.inner))
            except OSError:
                sock.close()
                raise
            inner_reader, out = await asyncio.open_unix_connection(sock=sock)
            await asyncio.gather(_pipe(reader, out), _pipe(inner_reader, writer))
        except (OSError, asyncio.CancelledError) as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("relay-failed", extra={"error": type(exc).__name__})
        finally:
            for w in (out, writer):
                if w is not None:
                    w.close()
            name.unlink(missing_ok=True)
            self._tasks.discard(task)
