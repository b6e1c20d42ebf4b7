"""HTTP calls to one backend (an sglang server, or the reference engine's, which has its shapes).

Errors are split in two: BackendError (the backend is gone, restarting or broke the stream: the
request is resumed elsewhere or later) and RejectedError (the backend refused the request itself,
HTTP 4xx: resubmitting would be refused again, so the client gets it).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp


class BackendError(RuntimeError):
    """The backend failed while serving: connection refused or reset, 5xx, stream cut short."""


class RejectedError(RuntimeError):
    """The backend refused the request (4xx); `status` and the backend's message are kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_NETWORK = (aiohttp.ClientError, ConnectionError, TimeoutError)


async def healthy(session: aiohttp.ClientSession, base: str, *, timeout: float = 2.0) -> bool:
    """True when GET {base}/health answers 200 within `timeout` seconds."""
    try:
        async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status == 200
    except _NETWORK:
        return False


async def tokenize(session: aiohttp.ClientSession, base: str, payload: dict[str, Any]) -> list[int]:
    """The backend's token ids for `payload` ({"prompt": text} or {"messages": [...]}) via /tokenize."""
    try:
        async with session.post(base + "/tokenize", json=payload) as r:
            body = await r.read()
            _check_status(r.status, body)
            tokens = json.loads(body).get("tokens")
    except _NETWORK as exc:
        raise BackendError(f"{base}/tokenize: {type(exc).__name__}: {exc}") from exc
    if not isinstance(tokens, list) or not tokens:
        raise RejectedError(400, "the prompt has no tokens")
    return [int(t) for t in tokens]


async def abort(session: aiohttp.ClientSession, base: str, rid: str) -> None:
    """Ask the backend to drop `rid` (best effort: it may still run it, or be gone)."""
    try:
        async with session.post(base + "/abort_request", json={"rid": rid},
                                timeout=aiohttp.ClientTimeout(total=2.0)) as r:
            await r.read()
    except _NETWORK:
        pass


async def generate(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """POST {base}/generate with stream=true and yield each event (a JSON object) until [DONE].

    Raises BackendError when the connection fails or the stream ends without [DONE], RejectedError
    for a 4xx answer.
    """
    try:
        async with session.post(base + "/generate", json=body) as r:
            if r.status != 200:
                _check_status(r.status, await r.read())
            async for event in _sse_events(r.content):
                if event is None:
                    return
                yield event
    except _NETWORK as exc:
        raise BackendError(f"{base}/generate: {type(exc).__name__}: {exc}") from exc
    raise BackendError(f"{base}/generate: the stream ended without [DONE]")


async def _sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any] | None]:
    """Events of an SSE body: each `data: {json}` as a dict, `data: [DONE]` as None."""
    async for raw in content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            yield None
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise BackendError(f"malformed event from the backend: {data[:200]!r}") from exc
        if not isinstance(event, dict):
            raise BackendError(f"malformed event from the backend: {data[:200]!r}")
        if "error" in event and "output_ids" not in event:
            raise BackendError(f"the backend reported an error: {str(event['error'])[:300]}")
        yield event


def _check_status(status: int, body: bytes) -> None:
    if status < 300:
        return
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:300].decode(errors="replace")
    if 400 <= status < 500:
        raise RejectedError(status, message or f"HTTP {status}")
    raise BackendError(f"HTTP {status}: {message[:300]}")
