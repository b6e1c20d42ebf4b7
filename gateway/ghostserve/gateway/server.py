"""`ghostserve gateway`: the resume gateway's HTTP server and command line.

Serves sglang's `/generate` and OpenAI's `/v1/completions` and `/v1/chat/completions` (streamed or
not), `/health` (200 while some backend is healthy) and `/metrics` (Prometheus text). See
docs/gateway.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from ghostserve.gateway import backends as backends_mod
from ghostserve.gateway import discovery, relay, render, upstream
from ghostserve.gateway import progress as progress_mod
from ghostserve.gateway import requests as req_mod
from ghostserve.wire import logs

log = logging.getLogger("ghostserve.gateway")

RELAY = web.AppKey("relay", relay.Relay)


def create_app(
    list_backends: Callable[[], Awaitable[Sequence[backends_mod.Backend]]],
    *,
    limits: relay.Limits | None = None,
    stall_timeout: float = 120.0,
    prefer_same_for: float = 30.0,
) -> web.Application:
    """The gateway's aiohttp application over the backends `list_backends` returns."""
    app = web.Application(client_max_size=64 << 20)

    async def lifecycle(app: web.Application) -> Any:
        timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=stall_timeout)
        session = aiohttp.ClientSession(timeout=timeout)
        pool = backends_mod.Pool(session, list_backends=list_backends, prefer_same_for=prefer_same_for)
        app[RELAY] = relay.Relay(session, pool, limits=limits or relay.Limits())
        yield
        await session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/generate", _endpoint(req_mod.Kind.GENERATE))
    app.router.add_post("/v1/completions", _endpoint(req_mod.Kind.COMPLETIONS))
    app.router.add_post("/v1/chat/completions", _endpoint(req_mod.Kind.CHAT))
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


def _endpoint(kind: req_mod.Kind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(kind, 400, "the request body is not valid JSON")
        try:
            job = req_mod.parse(kind, body)
        except req_mod.BadRequest as exc:
            return _error(kind, 400, str(exc))
        return await _serve(request, job)

    return handler


async def _serve(request: web.Request, job: req_mod.Job) -> web.StreamResponse:
    rl = request.app[RELAY]
    response: web.StreamResponse | None = None
    try:
        prompt = await rl.prompt_ids(job)
        progress = progress_mod.Progress(job.rid, prompt, job.max_new_tokens, job.sampling)
        renderer = render.Renderer(job, progress)
        async for update in rl.run(job, progress):
            renderer.last_meta = update.meta
            if not job.stream:
                continue
            chunks = renderer.stream_chunks(update.new_ids, update.new_text)
            if chunks and response is None:
                response = await _open_stream(request)
            for chunk in chunks:
                await response.write(chunk)  # type: ignore[union-attr]
        if not job.stream:
            return web.json_response(renderer.whole())
        if response is None:
            response = await _open_stream(request)
        await response.write(render.DONE)
        await response.write_eof()
        return response
    except upstream.RejectedError as exc:
        status, message = exc.status, str(exc)
    except (upstream.BackendError, backends_mod.NoBackendError) as exc:
        status, message = 503, str(exc)
    log.warning("request %s failed: %s %s", job.rid, status, message)
    if response is None:
        return _error(job.kind, status, message)
    await response.write(render.sse({"error": render.error_body(job.kind, status, message)}))
    await response.write(render.DONE)
    await response.write_eof()
    return response


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


def _error(kind: req_mod.Kind, status: int, message: str) -> web.Response:
    return web.json_response(render.error_body(kind, status, message), status=status)


async def _health(request: web.Request) -> web.Response:
    _, up = await request.app[RELAY].pool.healthy()
    return web.json_response({"healthy_backends": [b.name for b in up]}, status=200 if up else 503)


async def _metrics(request: web.Request) -> web.Response:
    c = request.app[RELAY].counters
    lines = [
        "# TYPE ghostserve_gateway_requests_total counter",
        f"ghostserve_gateway_requests_total {c.requests}",
        "# TYPE ghostserve_gateway_resumes_total counter",
        f"ghostserve_gateway_resumes_total {c.resumes}",
        "# TYPE ghostserve_gateway_failed_total counter",
        f"ghostserve_gateway_failed_total {c.failed}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ghostserve gateway", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="0.0.0.0:8000", help="HOST:PORT to serve on")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backend", action="append", help="backend URL (repeatable)")
    src.add_argument("--selector", help="label selector of the backend pods (Kubernetes discovery)")
    p.add_argument("--namespace", help="namespace of the backend pods (with --selector)")
    p.add_argument("--backend-port", type=int, default=30000, help="backends' port (with --selector)")
    p.add_argument("--resume-timeout", type=float, default=300.0,
                   help="seconds a request waits for a healthy backend after a failure")
    p.add_argument("--stall-timeout", type=float, default=120.0,
                   help="seconds without a byte from a backend before it counts as failed")
    p.add_argument("--prefer-same-for", type=float, default=30.0,
                   help="seconds a resumed request waits for its own backend before taking another")
    args = p.parse_args(list(argv))
    if args.selector and not args.namespace:
        p.error("--selector needs --namespace")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--listen must be HOST:PORT, got {args.listen!r}")
    try:
        args.backends = [backends_mod.parse_url(u) for u in args.backend or []]
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    logs.setup()  # JSON lines on stderr, level from GHOSTSERVE_LOG_LEVEL (docs/design.md §10)
    if args.selector:
        lister = discovery.KubeLister(
            namespace=args.namespace, selector=args.selector, port=args.backend_port
        )
        list_backends: Callable[[], Awaitable[Sequence[backends_mod.Backend]]] = lister
    else:
        static = list(args.backends)

        async def list_static() -> Sequence[backends_mod.Backend]:
            return static

        list_backends = list_static
    app = create_app(
        list_backends,
        limits=relay.Limits(wait=args.resume_timeout),
        stall_timeout=args.stall_timeout,
        prefer_same_for=args.prefer_same_for,
    )
    host, _, port = args.listen.rpartition(":")
    asyncio.run(_serve_forever(app, host.strip("[]"), int(port)))
    return 0


async def _serve_forever(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("gateway listening on %s:%d", host, port)
    print(json.dumps({"listening": f"{host}:{port}"}), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
