"""Runs one request to completion across backend failures: the gateway's resume loop.

A backend failure (connection refused or reset, a 5xx, a stream cut short, an abort) does not reach
the client. The relay waits (bounded) for a healthy backend, preferring the one the request was on,
and resubmits the same rid with prompt + the tokens produced so far and the remaining budget. It
gives up when the request went `wait` seconds without a new token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from ghostserve.gateway import backends as backends_mod
from ghostserve.gateway import progress as progress_mod
from ghostserve.gateway import requests as req_mod
from ghostserve.gateway import upstream

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
    wait: float = 300.0  # seconds a request may go without a new token across failures before it fails
    backoff: float = 0.2  # first pause after a failed attempt; doubles per failure in a row, up to 5 s


@dataclasses.dataclass
class Counters:
    requests: int = 0
    resumes: int = 0
    failed: int = 0


@dataclasses.dataclass(frozen=True)
class Update:
    """What one backend event added, with the backend's latest meta_info."""

    new_ids: list[int]
    new_text: str
    meta: dict[str, Any]


class Relay:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        pool: backends_mod.Pool,
        *,
        limits: Limits | None = None,
        counters: Counters | None = None,
    ) -> None:
        self.session = session
        self.pool = pool
        self.limits = limits or Limits()
        self.counters = counters or Counters()

    async def prompt_ids(self, job: req_mod.Job) -> list[int]:
        """The prompt as token ids: given, or from a backend's /tokenize (retried like generation)."""
        if job.input_ids is not None:
            return list(job.input_ids)
        payload: dict[str, Any] = {"messages": list(job.messages)} if job.messages else {"prompt": job.text}
        failures = 0
        start = time.monotonic()
        while True:
            backend = await self.pool.pick(wait=self.limits.wait)
            try:
                return await upstream.tokenize(self.session, backend.url, payload)
            except upstream.BackendError as exc:
                self.pool.mark_down(backend.name)
                failures += 1
                if time.monotonic() - start > self.limits.wait:
                    raise
                log.warning("tokenize on %s failed (%s); retrying", backend.name, exc)
                await asyncio.sleep(min(self.limits.backoff * 2 ** (failures - 1), 5.0))

    async def run(self, job: req_mod.Job, progress: progress_mod.Progress) -> AsyncIterator[Update]:
        """Yield every update of `progress` until it is done. Raises upstream.RejectedError,
        upstream.BackendError (too many failures in a row) and backends.NoBackendError."""
        self.counters.requests += 1
        prefer: str | None = None
        failures = 0
        progressed_at = time.monotonic()
        while not progress.done:
            backend = await self.pool.pick(wait=self.limits.wait, prefer=prefer)
            body = progress.next_body(backend.name)
            before = len(progress.output_ids)
            try:
                events = upstream.generate(self.session, backend.url, body)
                async with contextlib.aclosing(events):
                    async for event in events:
                        message = progress.aborted(event)
                        if message is not None:
                            raise upstream.BackendError(f"the backend aborted the request: {message}")
                        new_ids, new_text = progress.update(event)
                        yield Update(new_ids, new_text, dict(event.get("meta_info") or {}))
                        if progress.done:
                            break
                if not progress.done:
                    raise upstream.BackendError("the stream ended without a finish reason")
            except (upstream.BackendError, progress_mod.ProtocolError) as exc:
                if len(progress.output_ids) > before:
                    failures, progressed_at = 0, time.monotonic()
                failures += 1
                if time.monotonic() - progressed_at > self.limits.wait:
                    self.counters.failed += 1
                    raise upstream.BackendError(
                        f"{job.rid}: no new token for {self.limits.wait:.0f} s across {failures} attempts; "
                        f"last: {exc}"
                    ) from exc
                self.counters.resumes += 1
                log.warning(
                    "request %s lost its backend %s after %d tokens (%s); resuming",
                    job.rid, backend.name, len(progress.output_ids), exc,
                )
                self.pool.mark_down(backend.name)
                # The backend may still run it (a cut connection, not a crash): free the rid there.
                await upstream.abort(self.session, backend.url, job.rid)
                prefer = backend.name
                # A dying server may still answer /health for a moment: do not spin on it.
                await asyncio.sleep(min(self.limits.backoff * 2 ** (failures - 1), 5.0))
