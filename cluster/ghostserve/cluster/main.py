"""`ghostserve cluster`: run the embedded cluster until interrupted, then tear it all down.

Prints the kubeconfig path for Python clients (kubernetes / kubernetes_asyncio / kopf) and each
node's sidecar address. Nothing is left running and no /dev/shm segment is left after it exits.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence

from ghostserve.cluster import chart, embedded
from ghostserve.wire import logs
from rich.console import Console


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ghostserve cluster", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2, help="simulated GPU nodes (default 2)")
    p.add_argument("--gpus", type=int, default=4, help="fake GPUs per node (default 4)")
    p.add_argument("--namespace", default="default")
    p.add_argument(
        "--workdir", type=pathlib.Path, help="state, logs and the kubeconfig (default: a temp dir)"
    )
    p.add_argument(
        "--apply", type=pathlib.Path, action="append", default=[], help="manifest to apply (repeatable)"
    )
    p.add_argument("--no-operator", action="store_true", help="do not run the operator")
    p.add_argument(
        "--ip-prefix", default="127.0", help="loopback block: nodes get PREFIX.10.N (default 127.0)"
    )
    args = p.parse_args(list(argv))
    if not 1 <= args.nodes <= 200 or not 1 <= args.gpus <= 16:
        p.error("--nodes must be in [1, 200] and --gpus in [1, 16]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console()
    # The stand-ins' warnings as the project's JSON lines; only warnings unless GHOSTSERVE_LOG_LEVEL says
    # otherwise, so they do not drown the console output.
    logs.setup(None if os.environ.get("GHOSTSERVE_LOG_LEVEL") else "WARNING")
    try:
        docs = embedded.manifests(args.apply)
        for doc in docs:
            embedded.resource_of(doc)
    except (OSError, ValueError) as exc:
        console.print(f"[red]ghostserve cluster:[/] {exc}")
        return 2
    own = args.workdir is None
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="gs-cluster-"))
    options = embedded.Options(
        workdir=workdir, nodes=args.nodes, gpus=args.gpus, namespace=args.namespace,
        ip_prefix=args.ip_prefix, operator=not args.no_operator,
    )  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = embedded.Cluster(options)
    try:
        with console.status("starting the embedded cluster"):
            cluster.start()
        for doc in docs:
            cluster.apply(doc)
        console.print(f"[green]embedded cluster up[/]: {args.nodes} nodes x {args.gpus} fake GPUs")
        console.print(f"  kubeconfig:  {cluster.kubeconfig}   (KUBECONFIG={cluster.kubeconfig})")
        for node in cluster.nodes.values():
            console.print(
                f"  {node.spec.name}: InternalIP {node.spec.ip}, sidecar {node.spec.sidecar_address}"
            )
        console.print(f"  logs:        {workdir}")
        console.print("Ctrl-C (or SIGTERM) tears everything down.")
        stop.wait()
    except (RuntimeError, chart.ChartError, TimeoutError) as exc:
        console.print(f"[red]ghostserve cluster:[/] {exc}")
        return 1
    finally:
        with console.status("tearing down"):
            try:
                cluster.stop()
            except RuntimeError as exc:
                console.print(f"[yellow]{exc}[/]")
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print("stopped; nothing left running")
    return 0
