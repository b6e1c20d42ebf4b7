"""Client traffic for the demo, tests and bench: long streaming /generate requests through the gateway.

Each stream records when every output token arrived (wall clock), so a fault's effect on the client
(the last token before it, the first token after it) is measured where the client sees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence

import aiohttp


class StreamError(RuntimeError):
    """The server broke the stream contract (an error status, output that went back, no [DONE])."""


@dataclasses.dataclass
class Stream:
    rid: str
    prompt: list[int]
    max_new_tokens: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)  # time.time() when token i arrived
    cached_tokens: int = 0
    finish_reason: str = ""

    def first_after(self, t: float) -> float | None:
        return next((x for x in self.times if x > t), None)

    def last_before(self, t: float) -> float | None:
        before = [x for x in self.times if x <= t]
        return before[-1] if before else None

    def outage(self, t: float) -> tuple[float, float] | None:
        """(last token from the failing engine, first token after the outage) for a fault at `t`: the
        longest pause between tokens from `t` on (tokens already in flight still arrive after `t`)."""
        after = [x for x in self.times if x > t]
        if not after:
            return None
        marks = [t, *after]
        gaps = [(marks[i + 1] - marks[i], i) for i in range(len(marks) - 1)]
        _, i = max(gaps)
        return marks[i], marks[i + 1]


def make_streams(
    count: int, *, prompt_tokens: int, new_tokens: int, vocab: int, seed: int, tag: str
) -> list[Stream]:
    """`count` requests with seeded random prompts (same seed: same prompts, whatever the tag)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(count)]
    return [Stream(f"{tag}-{i}", p, new_tokens) for i, p in enumerate(prompts)]


async def _one(session: aiohttp.ClientSession, url: str, s: Stream, on_token: Callable[[], None]) -> None:
    body = {
        "rid": s.rid,
        "input_ids": s.prompt,
        "sampling_params": {"max_new_tokens": s.max_new_tokens, "temperature": 0},
        "stream": True,
    }
    async with session.post(f"{url}/generate", json=body) as reply:
        if reply.status != 200:
            raise StreamError(f"{s.rid}: HTTP {reply.status}: {(await reply.text())[:300]}")
        done = False
        async for raw in reply.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                done = True
                break
            msg = json.loads(data)
            if "error" in msg:
                raise StreamError(f"{s.rid}: {msg['error']}")
            out = list(msg.get("output_ids") or [])
            if out[: len(s.tokens)] != s.tokens:
                raise StreamError(f"{s.rid}: output went back ({len(s.tokens)} tokens, then {len(out)})")
            now = time.time()
            for tok in out[len(s.tokens) :]:
                s.tokens.append(tok)
                s.times.append(now)
            meta = msg.get("meta_info") or {}
            s.cached_tokens = max(s.cached_tokens, int(meta.get("cached_tokens") or 0))
            s.finish_reason = str((meta.get("finish_reason") or {}).get("type", "") if isinstance(
                meta.get("finish_reason"), dict) else meta.get("finish_reason") or "")  # fmt: skip
            on_token()
        if not done:
            raise StreamError(f"{s.rid}: stream ended without [DONE] after {len(s.tokens)} tokens")


async def run(
    url: str,
    streams: Sequence[Stream],
    *,
    on_token: Callable[[], None] = lambda: None,
    timeout_s: float = 600.0,
) -> None:
    """Run every stream concurrently to the end. Raises StreamError (the first one that failed)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(_one(session, url, s, on_token) for s in streams))


async def wait_healthy(url: str, *, timeout_s: float = 120.0) -> None:
    """Until GET /health answers 200. Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                async with session.get(f"{url}/health") as reply:
                    if reply.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/health did not answer 200 in {timeout_s:.0f}s")
            await asyncio.sleep(0.2)
