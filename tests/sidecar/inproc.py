"""A real sidecar server (grpc.aio, real sockets, real shared memory) running in a background thread of
the test process: for tests that make thousands of calls (fuzzing), where a process per test is slow."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

from ghostserve.sidecar import client, config, server


class Background:
    def __init__(self, address: str, cfg: config.Config) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sidecar-loop", daemon=True)
        self.thread.start()
        self.server, self.port = self.run(self._start(address, cfg))

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, address: str, cfg: config.Config) -> tuple[server.SidecarServer, int]:
        srv, port = server.create_server(address, config=cfg)
        await srv.start()
        return srv, port

    def stop(self) -> None:
        self.run(self.server.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def unix_address(d: pathlib.Path) -> str:
    return f"unix://{d / 'sidecar.sock'}"


@contextlib.contextmanager
def served(d: pathlib.Path, cfg: config.Config) -> Iterator[client.SidecarClient]:
    """A background sidecar on a socket in `d` and a blocking client of it; both closed on exit."""
    bg = Background(unix_address(d), cfg)
    c = client.SidecarClient(unix_address(d), timeout=20)
    try:
        yield c
    finally:
        c.close()
        bg.stop()
