"""`python -m ghostserve.engine.reference.serve` / `ghostserve serve`: one pod's process tree.

The process runs the HTTP server (asyncio, aiohttp) and the driver (a thread that owns the engine);
the driver starts the tensor-parallel rank processes (forkserver children). Flags and variables:
serveargs; endpoints: httpapi; serving and resubmission: service. Exit status: 0 after SIGTERM/SIGINT,
2 for bad flags or variables, 4 when a rank's GPU died (the pod must be rescheduled without it), 1
when serving failed otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from aiohttp import web
from ghostserve.engine.reference import httpapi, serveargs, service
from ghostserve.wire import logs

log = logging.getLogger("ghostserve.serve")


async def _serve(svc: service.Service) -> int:
    cfg = svc.cfg
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    def on_exit(_code: int) -> None:  # the driver ended (fatal fault): stop serving
        loop.call_soon_threadsafe(done.set)

    svc.on_exit = on_exit
    runner = web.AppRunner(
        httpapi.make_app(svc), shutdown_timeout=2.0, handler_cancellation=True, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    log.info(
        "serving",
        extra={"model": cfg.model_path, "tp": cfg.tp, "group": cfg.group, "url": f"http://{cfg.host}:{cfg.port}"},
    )
    svc.start()
    try:
        await done.wait()
    finally:
        # Stop the driver first: it tells every open stream why it ends before the server closes them.
        await asyncio.to_thread(svc.stop)
        await runner.cleanup()
    return svc.exit_code


def _private_workdir() -> pathlib.Path:
    """$TMPDIR/ghostserve-serve/<pid>; directories of trees that died without cleaning up (SIGKILL)
    are removed first."""
    base = pathlib.Path(tempfile.gettempdir()) / "ghostserve-serve"
    base.mkdir(mode=0o700, exist_ok=True)
    for old in base.iterdir():
        if old.name.isdigit() and not pathlib.Path(f"/proc/{old.name}").exists():
            shutil.rmtree(old, ignore_errors=True)
    mine = base / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(mode=0o700)
    return mine


def main(argv: Sequence[str] | None = None) -> int:
    logs.setup()  # JSON lines on stderr, level from GHOSTSERVE_LOG_LEVEL (docs/design.md §10)
    try:
        cfg, ignored = serveargs.parse(sys.argv[1:] if argv is None else argv, os.environ)
    except serveargs.ServeArgsError as exc:
        print(f"ghostserve serve: {exc}", file=sys.stderr)
        return 2
    if ignored:
        log.warning("flags-ignored", extra={"flags": ignored, "why": "the reference engine has no use"})
    # Several pods may share a machine (the embedded cluster): each tree needs its own gloo stores.
    own = cfg.workdir is None
    if own:
        cfg = dataclasses.replace(cfg, workdir=_private_workdir())
    try:
        return asyncio.run(_serve(service.Service(cfg)))
    finally:
        if own and cfg.workdir is not None:
            shutil.rmtree(cfg.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
