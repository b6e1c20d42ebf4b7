"""Operator reaction time in the Kubernetes API emulator, at 1, 100 and 500 deployments of 8 ranks.

A real `ghostserve operator` process runs against the kmock-based emulator of tests/operator (with its
scheduler/kubelet stand-in and a stand-in sidecar that records call times). For each size, faults are
raised one at a time as fatal Xid events on the sidecar's health stream (the operator's fastest path),
each on a different deployment, and timed on one clock (this process runs the emulator and the sidecar):

- signal -> replacement pod created (POST seen by the API emulator): detection + decision + MarkLost +
  delete + create;
- signal -> sidecar Rebuild call: the above + the replacement running (instant in the emulator)
  + PlanRecovery.

Ratios are against the 1-deployment run of the same invocation. Also reports the operator's RSS.
Usage: python bench/operator.py [--quick] [--sizes 1,100,500] [--faults 7]
Writes bench/results/operator-<machine>.json (operator-quick-<machine>.json with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import benchlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ghostserve.v1 import sidecar_pb2 as pb  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.operator import harness  # noqa: E402

NS = "test"
TP = 8


def machine() -> dict[str, Any]:
    return benchlib.machine()


def versions() -> dict[str, str]:
    return {
        n: importlib.metadata.version(n) for n in ("kopf", "kmock", "grpcio", "kubernetes_asyncio", "aiohttp")
    }


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def manifest(name: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "ghostserve.io/v1alpha1",
        "kind": "GhostServeDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "engine": {"image": "lmsysorg/sglang:v0.5.3", "tensorParallel": TP},
            "recovery": {"backoffSeconds": 0, "maxRecoveriesPerHour": 100},
            "sidecar": {"port": port},
        },
    }


def serving_count(cluster: harness.Cluster) -> int:
    return cluster.count_phase(harness.GSD, NS, "Serving")


def more_serving(cluster: harness.Cluster, than: int) -> bool:
    return serving_count(cluster) > than


def more_rebuilds(cluster: harness.Cluster, than: int) -> bool:
    return sum(1 for n, _, _ in cluster.sidecar.calls if n == "Rebuild") > than


def recoveries_are(cluster: harness.Cluster, name: str, want: int) -> bool:
    return bool(((cluster.get(harness.GSD, NS, name) or {}).get("status") or {}).get("recoveries") == want)


def run_size(size: int, faults: int, progress: Progress, workdir: pathlib.Path) -> dict[str, Any]:
    with harness.Cluster() as cluster:
        for i in range(size + 2):  # two spare nodes
            cluster.write("create", harness.NODES, None, None, harness.node_object(f"n{i}", gpus=TP + 1))
        created: dict[str, list[float]] = {}

        def on_write(action: str, resource: Any, raw: dict[str, Any]) -> None:
            if action == "create" and resource == harness.PODS:
                created.setdefault(raw["metadata"]["name"], []).append(time.monotonic())

        cluster.call(lambda: _add_listener(cluster, on_write))
        proc = harness.OperatorProcess(
            cluster.kubeconfig(workdir / f"kubeconfig-{size}"),
            workdir / f"operator-{size}.log",
            "--resync-seconds",
            "60",
        )
        try:
            task = progress.add_task(f"{size} deployments: starting", total=size)
            t_setup = time.monotonic()
            for i in range(size):
                cluster.write("create", harness.GSD, NS, None, manifest(f"d{i}", cluster.sidecar_port))
            while (done := serving_count(cluster)) < size:
                progress.update(task, completed=done)
                cluster.wait_for(
                    functools.partial(more_serving, cluster, done), timeout=600, what="deployments serving"
                )
            progress.update(task, completed=size, description=f"{size} deployments: faults")
            setup_s = time.monotonic() - t_setup
            rss_idle = rss_mb(proc.proc.pid)
            to_create, to_rebuild = [], []
            for f in range(faults):
                name = f"d{f % size}"
                pod = cluster.get(harness.PODS, NS, f"{name}-g0-r3")
                assert pod is not None
                before = len(created.get(pod["metadata"]["name"], []))
                rebuilds = sum(1 for n, _, _ in cluster.sidecar.calls if n == "Rebuild")
                t0 = time.monotonic()
                cluster.push_health(
                    pb.HealthEvent(
                        gpu_index=int(pod["metadata"]["annotations"]["ghostserve.io/gpu"]),
                        kind=pb.XID,
                        xid=79,
                        fatal=True,
                        message="bench",
                        node=pod["spec"]["nodeName"],
                    )
                )
                cluster.wait_for(
                    functools.partial(more_rebuilds, cluster, rebuilds), timeout=120, what="rebuild call"
                )
                rebuild_t = [
                    t for n, r, t in cluster.sidecar.calls if n == "Rebuild" and r.group == f"{NS}/{name}-g0"
                ]
                to_create.append(created[pod["metadata"]["name"]][before] - t0)
                to_rebuild.append(rebuild_t[-1] - t0)
                want = f // size + 1
                cluster.wait_for(
                    functools.partial(recoveries_are, cluster, name, want),
                    timeout=120,
                    what="recovery recorded",
                )
            rss_after = rss_mb(proc.proc.pid)
        finally:
            proc.stop()
            progress.remove_task(task)
    return {
        "deployments": size,
        "ranks": size * TP,
        "faults": faults,
        "setup_seconds": round(setup_s, 2),
        "fault_to_replacement_s": {
            "median": statistics.median(to_create),
            "max": max(to_create),
            "samples": [round(x, 4) for x in to_create],
        },
        "fault_to_rebuild_s": {
            "median": statistics.median(to_rebuild),
            "max": max(to_rebuild),
            "samples": [round(x, 4) for x in to_rebuild],
        },
        "operator_rss_mb": {"serving": round(rss_idle, 1), "after_faults": round(rss_after, 1)},
    }


async def _add_listener(cluster: harness.Cluster, fn: Any) -> None:
    cluster.emulator.listeners.append(fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="sizes 1 and 100 only (under a minute)")
    p.add_argument("--sizes", default=None, help="comma-separated deployment counts (default 1,100,500)")
    p.add_argument("--faults", type=int, default=7, help="faults timed per size")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1,100" if args.quick else "1,100,500")).split(",")]
    info = machine()
    console = Console(width=130)
    results = []
    with tempfile.TemporaryDirectory(prefix="gs-bench-op-") as tmp, Progress(console=console) as progress:
        for size in sizes:
            results.append(run_size(size, args.faults, progress, pathlib.Path(tmp)))
    base = results[0]
    table = Table(title=f"operator reaction, {TP} ranks per deployment ({info['cpu']}, shared machine)")
    for col in (
        "deployments",
        "pods",
        "signal→replacement median",
        "signal→rebuild median",
        "ratio vs first",
        "RSS MB",
        "setup s",
    ):
        table.add_column(col)
    for r in results:
        ratio = r["fault_to_replacement_s"]["median"] / base["fault_to_replacement_s"]["median"]
        r["replacement_ratio_vs_first"] = round(ratio, 2)
        table.add_row(
            str(r["deployments"]),
            str(r["ranks"]),
            f"{r['fault_to_replacement_s']['median'] * 1000:.0f} ms",
            f"{r['fault_to_rebuild_s']['median'] * 1000:.0f} ms",
            f"{ratio:.2f}",
            f"{r['operator_rss_mb']['after_faults']:.0f}",
            f"{r['setup_seconds']:.1f}",
        )
    console.print(table)
    goal = next((r for r in results if r["deployments"] == 100), None)
    report = {
        "benchmark": "operator",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "versions": versions(),
        "quick": args.quick,
        "results": results,
        "goal": {
            "target": "signal -> replacement created <= 1 s median at 100 x 8",
            "met": None if goal is None else goal["fault_to_replacement_s"]["median"] <= 1.0,
        },
        "notes": "API server: kmock-based emulator in the benchmark process (scheduler/kubelet stand-in); "
        "sidecar: in-process gRPC stand-in; operator: a real `ghostserve operator` subprocess. "
        "The machine was shared with other jobs.",
    }
    kind = "operator-quick" if args.quick else "operator"
    out = args.out or ROOT / "bench" / "results" / f"{kind}-{info['slug']}.json"
    benchlib.write_report(out, report)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
