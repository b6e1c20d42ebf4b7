"""`ghostserve demo`: the whole system on the embedded cluster survives GPU faults mid-decode.

2 simulated nodes x 4 fake GPUs, the real operator and a real sidecar per node, the reference engine
in pods, the resume gateway in front. Scenario 1: a TP=2 replica (`--replicas 2`: replica 0 of two) takes a
fatal Xid on one GPU while long requests stream; the operator detects it from the node sidecar's
health stream, swaps the GPU on the same node and rebuilds the lost rank's KV; the streams resume
(any other replica's pod must be left alone). Scenario 2: a TP=4 replica fills a
node, so after the fault no healthy free GPU is left there and the replica moves to the other node
with its KV streamed sidecar to sidecar. Every output must equal a fault-free run's, token for token
(exit 1 otherwise). `ghostserve demo --no-cluster` runs the engine-only demo (no operator, no pods).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from ghostserve.cluster import api, demorun, embedded, scenarios, sglang_engine, timeline, traffic
from ghostserve.wire import logs
from rich.console import Console
from rich.table import Table


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ghostserve demo", description=__doc__.split("\n")[0])
    p.add_argument(
        "--no-cluster", action="store_true", help="the engine-only demo (see `--no-cluster --help`)"
    )
    p.add_argument("--requests", type=int, default=3, help="concurrent streaming requests")
    p.add_argument("--prompt", type=int, default=384, help="prompt tokens per request")
    p.add_argument("--tokens", type=int, default=40, help="new tokens per request")
    p.add_argument("--code", default="xor", choices=["xor", "rdp", "rs"])
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="TP=2 replicas in scenario 1 (default 1: with 2 the gateway resumes the hit replica's streams"
        " on the other one, recomputed, and the rebuilt KV goes unused; see docs/cluster.md)",
    )
    p.add_argument("--no-move", action="store_true", help="skip scenario 2 (the replica moves node)")
    p.add_argument("--keep", action="store_true", help="keep the cluster's logs (printed path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        default="reference",
        choices=["reference", "sglang"],
        help="sglang: real sglang servers from .venv-sglang on the CPU (device-fault scenario only)",
    )
    args = p.parse_args(list(argv))
    if args.requests < 1 or args.tokens < 8 or args.prompt < 16 or not 1 <= args.replicas <= 2:
        p.error("need --requests >= 1, --tokens >= 8, --prompt >= 16, --replicas 1 or 2")
    return args


def _scenario(
    console: Console,
    cluster: embedded.Cluster,
    args: argparse.Namespace,
    *,
    title: str,
    dep: scenarios.Deployment,
    rank: int,
) -> bool:
    """Deploy, run fault-free, run with a fatal Xid on `rank`'s GPU, report. True when tokens match."""
    with console.status(f"{title}: deploying {dep.name} (TP={dep.tp}) and its gateway"):
        scenarios.deploy(cluster, dep)
        url = scenarios.gateway(cluster, dep.name)
    pod = f"{dep.name}-r0"  # the fault hits replica 0; any other replica must stay untouched
    node, gpus = scenarios.pod_gpus(cluster, pod)
    others = {p: _uid_restarts(cluster, p) for p in _replica_pods(dep)[1:]}
    uuid = cluster.gpu_uuids(node)[gpus[rank]]

    def streams(tag: str) -> list[traffic.Stream]:
        return traffic.make_streams(
            args.requests,
            prompt_tokens=args.prompt,
            new_tokens=args.tokens,
            vocab=scenarios.DEMO_VOCAB,
            seed=args.seed,
            tag=f"{dep.name}-{tag}",
        )

    with console.status(f"{title}: fault-free run ({args.requests} streams)"):
        base = scenarios.stream(cluster, url, streams("ref"))
    before = int(scenarios.status_of(cluster, dep.name).get("recoveries") or 0)
    with console.status(f"{title}: streaming; Xid 79 on {node} GPU {gpus[rank]} (rank {rank}) mid-decode"):
        run = scenarios.stream(
            cluster,
            url,
            streams("run"),
            fault=lambda: cluster.inject_gpu_fault(node, gpus[rank], kind="XID", xid=79),
            settle=scenarios.recovered(cluster, dep.name, before + 1),
        )
    identical = run.outputs == base.outputs
    untouched = {p: _uid_restarts(cluster, p) == (uid, 0) for p, (uid, _) in others.items()}
    _report(
        console,
        cluster,
        title,
        dep,
        run,
        node=node,
        gpu=f"{gpus[rank]} ({uuid})",
        rank=rank,
        identical=identical,
        untouched=untouched,
    )
    with console.status(f"{title}: deleting {dep.name}; replacing the broken GPU"):
        scenarios.undeploy(cluster, dep.name)
        cluster.repair_gpu(node, gpus[rank])
        cluster.wait_for(
            lambda: scenarios.allocatable(cluster, node) == cluster.options.gpus, what="GPU back"
        )
    return identical and all(untouched.values())


def _replica_pods(dep: scenarios.Deployment) -> list[str]:
    return [f"{dep.name}-r{g}" for g in range(dep.replicas)]


def _uid_restarts(cluster: embedded.Cluster, name: str) -> tuple[str, int]:
    """(UID, container restarts) of a pod: the same pair after a fault = the pod was left alone."""
    pod = cluster.get(api.PODS, name) or {}
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return str(pod.get("metadata", {}).get("uid", "")), sum(int(c.get("restartCount") or 0) for c in statuses)


def _report(
    console: Console,
    cluster: embedded.Cluster,
    title: str,
    dep: scenarios.Deployment,
    run: scenarios.Outcome,
    *,
    node: str,
    gpu: str,
    rank: int,
    identical: bool,
    untouched: dict[str, bool],
) -> None:
    last: dict[str, Any] = scenarios.status_of(cluster, dep.name).get("lastRecovery") or {}
    t = Table(title=f"{title}: fatal Xid 79 on {node} GPU {gpu}, rank {rank} of {dep.name}-r0 (TP={dep.tp})")
    t.add_column("after the fault", justify="right")
    t.add_column("what")
    t.add_column("seen in")
    for row in timeline.rows(run, dep.name):
        t.add_row(f"{row.seconds:7.3f} s", row.what[:110], row.source)
    console.print(t)
    s = Table(show_header=False)
    s.add_row("outcome (status.lastRecovery)", f"{last.get('outcome')}: {last.get('message', '')}")
    s.add_row("KV", f"{last.get('kv', '?')}: {last.get('sourceNode', '?')} -> {last.get('targetNode', '?')}")
    s.add_row(
        "bytes rebuilt / moved", f"{int(last.get('bytesRebuilt', 0)):,} / {int(last.get('bytesMoved', 0)):,}"
    )
    s.add_row(
        "chunks rebuilt / recomputed", f"{last.get('chunksRebuilt', 0)} / {last.get('chunksRecomputed', 0)}"
    )
    s.add_row("detected -> recovered (operator)", f"{last.get('seconds', '?')} s")
    resumed = timeline.first_token_after(run.streams, run.fault_at or 0.0)
    s.add_row("fault -> first token after it (client)", f"{resumed:.3f} s" if resumed is not None else "n/a")
    s.add_row(
        "KV reused on resume (tokens per request)", ", ".join(str(x.cached_tokens) for x in run.streams)
    )
    s.add_row("output tokens = fault-free run (every stream)", "[green]yes[/]" if identical else "[red]NO[/]")
    for name, same in untouched.items():
        placed = scenarios.pod_gpus(cluster, name)[0]
        s.add_row(
            f"{name} on {placed} (same pod, no restart)", "[green]yes[/]" if same else "[red]NO: recreated[/]"
        )
    console.print(s)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--no-cluster" in raw:
        from ghostserve.engine import demo as engine_demo

        return int(engine_demo.main([a for a in raw if a != "--no-cluster"]) or 0)
    args = parse_args(raw)
    console = Console()
    if args.engine == "sglang":
        return sglang_engine.main(args, console, report=_report)
    # The stand-ins' warnings as the project's JSON lines; only warnings unless GHOSTSERVE_LOG_LEVEL says
    # otherwise, so they do not drown the console output.
    logs.setup(None if os.environ.get("GHOSTSERVE_LOG_LEVEL") else "WARNING")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gs-demo-", dir="/tmp"))
    cluster = embedded.Cluster(embedded.Options(workdir=workdir, nodes=2, gpus=4))
    t0 = time.monotonic()

    def body() -> bool:
        ok = True
        with console.status(
            "starting the embedded cluster: API server, 2 nodes x 4 GPUs, sidecars, operator"
        ):
            cluster.start()
        console.print(
            f"[green]cluster up[/] in {time.monotonic() - t0:.1f} s (kubeconfig {cluster.kubeconfig})"
        )
        ok &= _scenario(
            console,
            cluster,
            args,
            title="1. device fault, healthy GPU free on the node",
            dep=scenarios.Deployment("swap", tp=2, code=args.code, replicas=args.replicas),
            rank=1,
        )
        if not args.no_move:
            ok &= _scenario(
                console,
                cluster,
                args,
                title="2. device fault, no healthy GPU left on the node",
                dep=scenarios.Deployment("move", tp=4, code=args.code),
                rank=2,
            )
        return ok

    return demorun.run(console, cluster, workdir=workdir, keep=args.keep, t0=t0, body=body)
