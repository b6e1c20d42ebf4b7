"""Cluster recovery benchmark: fault -> first token after recovery on the embedded cluster, by phase.

One embedded cluster (2 nodes x 4 fake GPUs, the real operator, a real sidecar per node, the
reference engine in pods, the resume gateway). Two TP=2 deployments serve the same streaming
requests side by side in the same run, one per node:

  protected:  xor parity; a fatal Xid on rank 1's GPU -> same-node GPU swap, the lost rank's KV rebuilt
              from the survivors + parity, the held requests resume from the sidecar's KV;
  recompute:  protection off (`code: none`); the same fault -> the same GPU swap, every request's KV
              recomputed from scratch when the gateway resubmits it.

Each sample injects the fault into one deployment while its streams are mid-decode, then (after the
recovery) the GPU is replaced; the two sides alternate. Phases come from the API server's record of
the operator's status steps and Events (cluster/ghostserve/cluster/timeline.py): detection,
kv_restore, scheduling, engine_start, resume, and total = fault -> first token after the outage.
Reported: per side the median/min/max of every phase over --repeat (>= 3) samples, and the ratio
recompute total / protected total per round, with the KV bytes each side restored (rebuilt + moved)
and the tokens the recompute side had to prefill again.

usage: python bench/cluster.py [--repeat 3] [--requests 3] [--prompt 1536] [--tokens 32]
Writes bench/results/cluster-<machine>.json.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import benchlib
from ghostserve.cluster import embedded, scenarios, timeline, traffic
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

REPO = pathlib.Path(__file__).resolve().parents[1]


def _sample(
    cluster: embedded.Cluster, side: scenarios.Deployment, url: str, streams: list[traffic.Stream]
) -> tuple[dict[str, float], dict[str, Any], scenarios.Outcome]:
    pod = scenarios.engine_pods(cluster, side.name)[0]["metadata"]["name"]
    node, gpus = scenarios.pod_gpus(cluster, pod)
    before = int(scenarios.status_of(cluster, side.name).get("recoveries") or 0)
    out = scenarios.stream(
        cluster,
        url,
        streams,
        fault=lambda: cluster.inject_gpu_fault(node, gpus[1], xid=79),
        settle=scenarios.recovered(cluster, side.name, before + 1),
    )
    last = dict(scenarios.status_of(cluster, side.name).get("lastRecovery") or {})
    cluster.repair_gpu(node, gpus[1])
    cluster.wait_for(
        lambda: scenarios.allocatable(cluster, node) >= cluster.options.gpus - 2, what="GPU replaced"
    )
    return timeline.phases(out, side.name), last, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--prompt", type=int, default=1536)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args(argv)
    if args.repeat < 3:
        p.error("--repeat must be >= 3 (median and spread)")
    console = Console()
    load_before = benchlib.load_average()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gs-bench-cluster-", dir="/tmp"))
    sides = {
        "protected": scenarios.Deployment("prot", tp=2, code="xor"),
        "recompute": scenarios.Deployment("reco", tp=2, code="none"),
    }
    results: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    extra: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    identical: dict[str, list[bool]] = {k: [] for k in sides}
    cluster = embedded.Cluster(embedded.Options(workdir=workdir))
    try:
        with console.status("starting the embedded cluster and both deployments"):
            cluster.start()
            urls = {}
            for key, dep in sides.items():
                scenarios.deploy(cluster, dep)
                urls[key] = scenarios.gateway(cluster, dep.name)

        def streams(tag: str) -> list[traffic.Stream]:
            return traffic.make_streams(
                args.requests,
                prompt_tokens=args.prompt,
                new_tokens=args.tokens,
                vocab=scenarios.DEMO_VOCAB,
                seed=3,
                tag=tag,
            )

        with console.status("fault-free reference run"):
            reference = scenarios.stream(cluster, urls["protected"], streams("prot-ref")).outputs
        with Progress(console=console) as progress:
            task = progress.add_task("faults", total=args.repeat * len(sides))
            for i in range(args.repeat):
                for key, dep in sides.items():
                    progress.update(task, description=f"round {i + 1}: {key}")
                    phases, last, out = _sample(cluster, dep, urls[key], streams(f"{dep.name}-{i}"))
                    results[key].append(phases)
                    identical[key].append(out.outputs == reference)
                    extra[key].append(
                        {
                            "kv": last.get("kv"),
                            "outcome": last.get("outcome"),
                            "bytes_restored": int(last.get("bytesRebuilt", 0))
                            + int(last.get("bytesMoved", 0)),
                            "cached_tokens": [s.cached_tokens for s in out.streams],
                            "tokens_recomputed": sum(
                                len(s.prompt) + len(s.tokens) - s.cached_tokens for s in out.streams
                            ),
                        }
                    )
                    progress.advance(task)
    finally:
        with console.status("tearing down"):
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    names = (*timeline.PHASES, "total")
    summary = {k: {ph: benchlib.spread([r[ph] for r in results[k]]) for ph in names} for k in sides}
    ratio = benchlib.spread(
        [r["total"] / p["total"] for r, p in zip(results["recompute"], results["protected"], strict=True)]
    )
    table = Table(title="fault -> first token after the outage, seconds: median (min, max)")
    table.add_column("phase")
    for key in sides:
        table.add_column(key, justify="right")
    for ph in names:
        table.add_row(
            ph,
            *(
                f"{summary[k][ph]['median']} ({summary[k][ph]['min']}, {summary[k][ph]['max']})"
                for k in sides
            ),
        )
    console.print(table)
    console.print(
        f"recompute / protected (total, per round): median {ratio['median']} ({ratio['min']}, {ratio['max']})"
    )
    console.print(f"outputs identical to the fault-free run: {identical}")
    report = {
        "benchmark": "cluster",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": benchlib.machine(),
        "load_before": load_before,
        "load_after": benchlib.load_average(),
        "config": {
            **vars(args),
            "out": str(args.out) if args.out else None,
            "tp": 2,
            "model": scenarios.DEMO_MODEL,
        },
        "phases_seconds": summary,
        "ratio_recompute_over_protected_total": ratio,
        "samples": {k: [{**r, **e} for r, e in zip(results[k], extra[k], strict=True)] for k in sides},
        "outputs_identical": identical,
    }
    path = args.out or REPO / "bench" / "results" / f"cluster-{benchlib.machine()['slug']}.json"
    return benchlib.save(path, report, console.print)


if __name__ == "__main__":
    sys.exit(main())
