"""HTTP endpoints of `ghostserve serve`, in sglang's shapes (aiohttp).

- ``GET /health``: 200 once the ranks are up and serving, 503 before and after.
- ``GET /get_model_info``: ``{"model_path", "tokenizer_path", "is_generation", ...}``.
- ``POST /generate``: ``{"rid"?, "text" | "input_ids", "sampling_params": {"max_new_tokens",
  "temperature": 0}, "stream"?}`` → ``{"text", "output_ids", "meta_info": {"id", "prompt_tokens",
  "completion_tokens", "cached_tokens", "finish_reason"}}``; with ``stream`` every new token sends an
  SSE line ``data: {json}\\n\\n`` with the cumulative output so far, then ``data: [DONE]\\n\\n``. When
  serving fails mid-stream (a device fault, shutdown) the last event carries sglang's abort reason,
  ``finish_reason: {"type": "abort", "message", "status_code"}``, with the output so far: a client
  (the gateway) resubmits the request (service.py says how).
- ``GET /ghostserve/state``: rank pids, generations, recoveries, running/waiting/held requests (tests,
  demo).

Bad requests get 400 with ``{"error": {"message"}}`` and change nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from ghostserve.engine.reference import jobs as jobs_mod
from ghostserve.engine.reference import service as service_mod
from ghostserve.engine.reference import tokenizer as tokenizer_mod

DEFAULT_MAX_NEW_TOKENS = 128  # sglang's default
SERVICE: web.AppKey[service_mod.Service] = web.AppKey("service", service_mod.Service)
TOKENIZER: web.AppKey[tokenizer_mod.ByteTokenizer] = web.AppKey("tokenizer", tokenizer_mod.ByteTokenizer)


class BadRequest(ValueError):
    """A /generate body the engine cannot serve; the message says why."""


@dataclasses.dataclass(frozen=True)
class Generate:
    rid: str | None
    input_ids: list[int]
    max_new_tokens: int
    stream: bool


def parse_generate(body: Any, tok: tokenizer_mod.ByteTokenizer) -> Generate:
    """Validate a /generate body (pure). Raises BadRequest."""
    if not isinstance(body, Mapping):
        raise BadRequest("the body must be a JSON object")
    rid = body.get("rid")
    if rid is not None and (not isinstance(rid, str) or not 0 < len(rid) <= 200):
        raise BadRequest("rid must be a non-empty string of at most 200 characters")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("give exactly one of text or input_ids")
    if text is not None:
        if not isinstance(text, str):
            raise BadRequest("text must be a string (batches are not supported)")
        input_ids = tok.encode(text)
    else:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRequest("input_ids must be a list of integers (batches are not supported)")
        bad = [i for i in ids if not 0 <= i < tok.vocab]
        if bad:
            raise BadRequest(f"input_ids outside [0, {tok.vocab}): {bad[:5]}")
        input_ids = list(ids)
    if not input_ids:
        raise BadRequest("the prompt is empty")
    params = body.get("sampling_params") or {}
    if not isinstance(params, Mapping):
        raise BadRequest("sampling_params must be an object")
    max_new = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new <= 0:
        raise BadRequest("sampling_params.max_new_tokens must be an integer > 0")
    temperature = params.get("temperature", 0)
    if not isinstance(temperature, int | float) or temperature != 0:
        raise BadRequest("the reference engine decodes greedily: sampling_params.temperature must be 0")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    return Generate(rid, input_ids, max_new, stream)


def reply(rid: str, out: jobs_mod.Output, tok: tokenizer_mod.ByteTokenizer) -> dict[str, Any]:
    """sglang's /generate reply for the output so far (pure)."""
    finish = {"type": "length", "length": out.max_new_tokens} if out.done else None
    return {
        "text": tok.decode(out.output_ids),
        "output_ids": list(out.output_ids),
        "meta_info": {
            "id": rid,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": len(out.output_ids),
            "cached_tokens": out.cached_tokens,
            "finish_reason": finish,
        },
    }


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def health(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    if svc.ready.is_set() and not svc.stopped.is_set():
        return web.Response(text="ok")
    return web.Response(status=503, text=svc.error or "starting")


async def model_info(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response(
        {
            "model_path": svc.cfg.model_path,
            "tokenizer_path": None,
            "is_generation": True,
            "tokenizer": "utf-8 bytes (ids 0-255); ids >= 256 decode as <|id|>",
            "model": dataclasses.asdict(svc.cfg.model),
            "tp_size": svc.cfg.tp,
            "page_size": svc.cfg.page_size,
            "protection": dataclasses.asdict(svc.cfg.protection),
            "group": svc.cfg.group,
        }
    )


async def state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].snapshot)


async def generate(request: web.Request) -> web.StreamResponse:
    svc, tok = request.app[SERVICE], request.app[TOKENIZER]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error("the body is not JSON", 400)
    try:
        gen = parse_generate(body, tok)
    except BadRequest as exc:
        return _error(str(exc), 400)
    if not svc.ready.is_set() or svc.stopped.is_set():
        return _error(svc.error or "not ready", 503)
    rid = gen.rid or svc.new_rid()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[jobs_mod.Event] = asyncio.Queue()

    def emit(event: jobs_mod.Event) -> None:  # driver thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    svc.submit(jobs_mod.Job(rid, gen.input_ids, gen.max_new_tokens, emit))
    finished = False
    try:
        if not gen.stream:
            while True:
                event = await events.get()
                if isinstance(event, jobs_mod.Failure):
                    finished = True
                    return _error(event.message, event.status)
                if event.done:
                    finished = True
                    return web.json_response(reply(rid, event, tok))
        event = await events.get()
        if isinstance(event, jobs_mod.Failure):  # refused before anything ran: a plain HTTP error
            finished = True
            return _error(event.message, event.status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        last = jobs_mod.Output((), len(gen.input_ids), 0, False, gen.max_new_tokens)
        while True:
            if isinstance(event, jobs_mod.Failure):
                finished = True
                await resp.write(_sse(_abort(rid, last, event, tok)))
                break
            last = event
            await resp.write(_sse(reply(rid, event, tok)))
            if event.done:
                finished = True
                break
            event = await events.get()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    finally:
        if not finished:
            svc.cancel(rid)  # the client went away: hold its KV for a resubmission


def _abort(
    rid: str, last: jobs_mod.Output, failure: jobs_mod.Failure, tok: tokenizer_mod.ByteTokenizer
) -> dict[str, Any]:
    """sglang's abort event: the output so far and why the request ended early."""
    body = reply(rid, last, tok)
    body["meta_info"]["finish_reason"] = {
        "type": "abort",
        "message": failure.message,
        "status_code": failure.status,
    }
    return body


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def make_app(svc: service_mod.Service) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SERVICE] = svc
    app[TOKENIZER] = tokenizer_mod.ByteTokenizer(svc.cfg.model.vocab)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/ghostserve/state", state)
    app.router.add_post("/generate", generate)
    return app
