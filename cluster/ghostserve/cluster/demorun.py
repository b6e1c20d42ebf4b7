"""How every demo ends, whatever engine it runs: a failure says where the logs are, the cluster is torn
down, the working directory is removed unless kept, and the verdict is printed."""

from __future__ import annotations

import pathlib
import shutil
import time
from collections.abc import Callable

from ghostserve.cluster import embedded, traffic
from rich.console import Console


def run(
    console: Console,
    cluster: embedded.Cluster,
    *,
    workdir: pathlib.Path,
    keep: bool,
    t0: float,
    body: Callable[[], bool],
) -> int:
    """Runs `body` (True: tokens identical) on a started-or-starting cluster; 0 when it held, else 1."""
    ok = False
    try:
        ok = body()
    except (RuntimeError, TimeoutError, traffic.StreamError) as exc:
        console.print(f"[red]ghostserve demo: {exc}[/]\nlogs: {workdir}")
        ok = False
        keep = True
    finally:
        with console.status("tearing down the cluster"):
            try:
                cluster.stop()
            except RuntimeError as exc:
                console.print(f"[red]{exc}[/]")
                ok = False
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    verdict = "[green]done" if ok else "[red]FAILED"
    console.print(f"{verdict}[/] in {time.monotonic() - t0:.1f} s; nothing left running")
    return 0 if ok else 1
