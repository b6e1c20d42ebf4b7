"""The backends a gateway may send a request to, and the choice of one (with bounded waiting).

Backends come from a fixed list of URLs or from Kubernetes (discovery.py); either way a backend has a
stable name (its URL, or its pod's name, which survives a container restart) and a current URL.
A resumed request goes back to the backend it was on when that one is healthy again: its sidecar
holds the request's KV, so the resubmission reuses it instead of recomputing the prompt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
from ghostserve.gateway import upstream


class NoBackendError(RuntimeError):
    """No healthy backend appeared within the wait limit."""


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    url: str  # base URL, no trailing slash


def parse_url(text: str) -> Backend:
    """A backend from `http://host:port` (a trailing slash is dropped). Raises ValueError."""
    url = text.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url.split("//", 1)[1]) == 0:
        raise ValueError(f"backend URL must be http(s)://host:port, got {text!r}")
    return Backend(url, url)


class Pool:
    """Backends and what the gateway knows of their health.

    A backend is presumed healthy until a request on it failed (`mark_down`): probing /health on every
    request would cost a generation on sglang, whose /health runs one. A backend marked down is
    probed until it answers again.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        list_backends: Callable[[], Awaitable[Sequence[Backend]]],
        probe_interval: float = 0.2,
        prefer_same_for: float = 30.0,
    ) -> None:
        self._session = session
        self._list = list_backends
        self._interval = probe_interval
        # How long a resumed request waits for its own backend before taking another healthy one.
        self._prefer_same_for = prefer_same_for
        self._rr = itertools.count()
        self._down: set[str] = set()

    def mark_down(self, name: str) -> None:
        self._down.add(name)

    async def healthy(self) -> tuple[list[Backend], list[Backend]]:
        """(every listed backend, the ones answering /health now)."""
        backends = list(await self._list())
        checks = await asyncio.gather(*(upstream.healthy(self._session, b.url) for b in backends))
        return backends, [b for b, ok in zip(backends, checks, strict=True) if ok]

    async def _usable(self) -> tuple[list[Backend], list[Backend]]:
        """(every listed backend, those not known to be down); probes the ones marked down."""
        listed = list(await self._list())
        down = [b for b in listed if b.name in self._down]
        if down:
            checks = await asyncio.gather(*(upstream.healthy(self._session, b.url) for b in down))
            for b, ok in zip(down, checks, strict=True):
                if ok:
                    self._down.discard(b.name)
        return listed, [b for b in listed if b.name not in self._down]

    async def pick(self, *, wait: float, prefer: str | None = None) -> Backend:
        """A usable backend, waiting up to `wait` seconds for one.

        With `prefer` (a backend name), that backend is taken as soon as it is usable; another one
        only after `prefer_same_for` seconds. The wait holds also while that backend is not listed:
        the operator recreates a replica under the same pod name (GPU swap, move), and until the new
        pod is Ready it is absent from the list, yet it is where the request's KV is being restored.
        Raises NoBackendError after `wait` seconds.
        """
        start = time.monotonic()
        while True:
            _, up = await self._usable()
            waited = time.monotonic() - start
            if prefer is not None:
                same = [b for b in up if b.name == prefer]
                if same:
                    return same[0]
                if waited < self._prefer_same_for:
                    up = []
            if up:
                return up[next(self._rr) % len(up)]
            if waited >= wait:
                raise NoBackendError(f"no healthy backend within {wait:.0f} s")
            await asyncio.sleep(self._interval)
