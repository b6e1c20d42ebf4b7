"""Operator reaction time in the Kubernetes API emulator, up to 1000 deployments x 8 ranks, including an
operator restart (SIGKILL) in the middle of a fault storm.

A real `ghostserve operator` process runs against the emulator of tests/operator (scheduler / kubelet /
device-plugin stand-in, one recording sidecar stand-in per node). Each deployment is one replica pod of
TP=8 (the pod model: one pod per replica). Faults are fatal GPU faults (`Cluster.fail_gpu`: the device
plugin marks the GPU unhealthy and the node's sidecar streams the Xid), each on a different deployment,
timed on one clock (this process runs the emulator and the sidecars):

- fault -> replacement: the replacement pod's creation seen by the API emulator (detection, decision,
  MarkLost, delete, create);
- fault -> rebuild requested: the node's sidecar receives Rebuild for the group.

Phases per size: `--faults` faults one at a time (the operator idle otherwise); then a storm of
`--storm` faults raised back to back, the operator SIGKILLed after half of them and started again at
once; every storm fault is timed to its replacement and rebuild as above (the restart included).
p50/p99 are nearest-rank over the samples (with fewer than 100 samples p99 is the largest). Nodes have
72 GPUs (9 replica slots) to stay within the harness's 254 loopback node addresses at 1000 x 8.
Usage: python bench/operator.py [--quick] [--sizes 1,100,1000] [--faults 7] [--storm 20]
Writes bench/results/operator-<machine>.json (operator-quick-<machine>.json with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import math
import pathlib
import sys
import tempfile
import time
from typing import Any

import benchlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.operator import harness  # noqa: E402

NS = "test"
TP = 8
GPUS_PER_NODE = 72


def versions() -> dict[str, str]:
    return {
        n: importlib.metadata.version(n) for n in ("kopf", "kmock", "grpcio", "kubernetes_asyncio", "aiohttp")
    }


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ghostserve.io/v1alpha1",
        "kind": "GhostServeDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "engine": {"image": "lmsysorg/sglang:v0.5.3", "tensorParallel": TP},
            "recovery": {"backoffSeconds": 0, "maxRecoveriesPerHour": 100},
        },
    }


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "n": len(samples),
        "p50": round(percentile(samples, 50), 4),
        "p99": round(percentile(samples, 99), 4),
        **benchlib.spread(samples, digits=4),
    }


class Timeline:
    """Creation times of pods (from the emulator's write listener) and Rebuild times (from the sidecars)."""

    def __init__(self, cluster: harness.Cluster) -> None:
        self.cluster = cluster
        self.created: dict[str, list[float]] = {}
        cluster.call(functools.partial(self._listen))

    async def _listen(self) -> None:
        self.cluster.emulator.listeners.append(self._on_write)

    def _on_write(self, action: str, resource: Any, raw: dict[str, Any]) -> None:
        if action == "create" and resource == harness.PODS:
            self.created.setdefault(raw["metadata"]["name"], []).append(time.monotonic())

    def created_after(self, pod: str, t0: float) -> float | None:
        return next((t for t in self.created.get(pod, []) if t >= t0), None)

    def rebuilt_after(self, group: str, t0: float) -> float | None:
        times = [
            t
            for side in list(self.cluster.sidecars.values())
            for n, r, t in list(side.calls)
            if n == "Rebuild" and getattr(r, "group", "") == group and t >= t0
        ]
        return min(times) if times else None


def serving(cluster: harness.Cluster) -> int:
    return cluster.count_phase(harness.GSD, NS, "Serving")


def more_serving(cluster: Any, than: int) -> bool:
    return serving(cluster) > than


def recoveries(cluster: harness.Cluster, name: str) -> int:
    return int(((cluster.get(harness.GSD, NS, name) or {}).get("status") or {}).get("recoveries") or 0)


def fault(cluster: harness.Cluster, name: str) -> tuple[float, str]:
    """A fatal GPU fault on the first GPU of deployment `name`'s replica 0; returns (t0, pod name)."""
    pod = cluster.get(harness.PODS, NS, f"{name}-r0")
    assert pod is not None, name
    t0 = time.monotonic()
    cluster.fail_gpu(pod["spec"]["nodeName"], harness.gpus_of(pod)[0])
    return t0, f"{name}-r0"


def start_operator(cluster: harness.Cluster, workdir: pathlib.Path, tag: str) -> harness.OperatorProcess:
    return harness.OperatorProcess(
        cluster.kubeconfig(workdir / f"kubeconfig-{tag}"),
        workdir / f"operator-{tag}.log",
        "--resync-seconds",
        "60",
        sidecar_port=cluster.sidecar_port,
    )


def timed(
    timeline: Timeline, cluster: harness.Cluster, faults: list[tuple[str, float, str]]
) -> tuple[list[float], list[float]]:
    """Wait until every fault's replacement exists, its rebuild was requested and the recovery was
    recorded; returns the two delays of each fault."""
    before = {name: recoveries(cluster, name) for name, _, _ in faults}
    to_create, to_rebuild = [], []
    for _, t0, pod in faults:
        created = cluster.wait_for(
            functools.partial(timeline.created_after, pod, t0), timeout=900, what=f"{pod} replaced"
        )
        rebuilt = cluster.wait_for(
            functools.partial(timeline.rebuilt_after, f"{NS}/{pod}", t0), timeout=900, what=f"{pod} rebuild"
        )
        to_create.append(created - t0)
        to_rebuild.append(rebuilt - t0)
    for name, _, _ in faults:
        cluster.wait_for(
            functools.partial(lambda n, want: recoveries(cluster, n) >= want, name, before[name] + 1),
            timeout=900,
            what=f"{name} recovered",
        )
    return to_create, to_rebuild


def run_size(size: int, faults: int, storm: int, progress: Progress, workdir: pathlib.Path) -> dict[str, Any]:
    nodes = max(3, math.ceil(size / (GPUS_PER_NODE // TP - 1)) + 1)  # one slot per node left for swaps
    with harness.Cluster() as cluster:
        for i in range(nodes):
            cluster.add_node(f"n{i}", gpus=GPUS_PER_NODE)
        timeline = Timeline(cluster)
        proc = start_operator(cluster, workdir, f"{size}-a")
        task = progress.add_task(f"{size} deployments: starting", total=size)
        try:
            t_setup = time.monotonic()
            for i in range(size):
                cluster.write("create", harness.GSD, NS, None, manifest(f"d{i}"))
            while (done := serving(cluster)) < size:
                progress.update(task, completed=done)
                cluster.wait_for(functools.partial(more_serving, cluster, done), timeout=1800, what="serving")
            setup_s = time.monotonic() - t_setup
            rss_serving = rss_mb(proc.proc.pid)
            progress.update(task, completed=size, description=f"{size} deployments: single faults")
            single_create, single_rebuild = [], []
            for f in range(faults):
                name = f"d{(f * 7919) % size}"  # spread over the deployments (the same one when size is 1)
                t0, pod = fault(cluster, name)
                c, r = timed(timeline, cluster, [(name, t0, pod)])
                single_create += c
                single_rebuild += r
            result: dict[str, Any] = {
                "deployments": size,
                "pods": size,
                "ranks": size * TP,
                "nodes": nodes,
                "setup_seconds": round(setup_s, 2),
                "single_fault": {
                    "fault_to_replacement_s": summary(single_create),
                    "fault_to_rebuild_requested_s": summary(single_rebuild),
                },
                "operator_rss_mb_serving": round(rss_serving, 1),
            }
            untouched = [f"d{i}" for i in range(size) if not recoveries(cluster, f"d{i}")]
            if storm and len(untouched) >= storm:
                progress.update(task, description=f"{size} deployments: storm + restart")
                victims = untouched[:: max(1, len(untouched) // storm)][:storm]
                raised: list[tuple[str, float, str]] = []
                for k, name in enumerate(victims):
                    if k == storm // 2:
                        proc.kill()  # SIGKILL in the middle of the storm, then a new operator at once
                        t_kill = time.monotonic()
                        proc = start_operator(cluster, workdir, f"{size}-b")
                    raised.append((name, *fault(cluster, name)))
                storm_create, storm_rebuild = timed(timeline, cluster, raised)
                result["storm_with_restart"] = {
                    "faults": storm,
                    "killed_after": storm // 2,
                    "fault_to_replacement_s": summary(storm_create),
                    "fault_to_rebuild_requested_s": summary(storm_rebuild),
                    "restart_to_last_replacement_s": round(
                        max(timeline.created_after(p, t) or 0 for _, t, p in raised) - t_kill, 3
                    ),
                }
            result["operator_rss_mb_after"] = round(rss_mb(proc.proc.pid), 1)
        finally:
            proc.stop()
            progress.remove_task(task)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="sizes 1 and 100, small storm (a few minutes)")
    p.add_argument("--sizes", default=None, help="comma-separated deployment counts (default 1,100,1000)")
    p.add_argument("--faults", type=int, default=7, help="single faults timed per size (>= 3)")
    p.add_argument("--storm", type=int, default=20, help="faults of the storm (0: none); needs >= 3")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1,100" if args.quick else "1,100,1000")).split(",")]
    storm = 6 if args.quick and args.storm == 20 else args.storm
    info = benchlib.machine()
    load_before = benchlib.load_average()
    console = Console(width=140)
    results = []
    with tempfile.TemporaryDirectory(prefix="gs-bench-op-") as tmp, Progress(console=console) as progress:
        for size in sizes:
            results.append(
                run_size(size, args.faults, storm if size >= 2 * storm else 0, progress, pathlib.Path(tmp))
            )
    table = Table(title=f"operator reaction, {TP} ranks per deployment ({info['cpu']}, shared machine)")
    for col in (
        "deployments",
        "phase",
        "n",
        "fault→replacement p50/p99",
        "fault→rebuild p50/p99",
        "setup s",
        "RSS MB",
    ):
        table.add_column(col)
    for r in results:
        phases = [("single", r["single_fault"])] + (
            [("storm+restart", r["storm_with_restart"])] if "storm_with_restart" in r else []
        )
        for label, ph in phases:
            c, b = ph["fault_to_replacement_s"], ph["fault_to_rebuild_requested_s"]
            table.add_row(
                str(r["deployments"]),
                label,
                str(c["n"]),
                f"{c['p50'] * 1000:.0f} / {c['p99'] * 1000:.0f} ms",
                f"{b['p50'] * 1000:.0f} / {b['p99'] * 1000:.0f} ms",
                f"{r['setup_seconds']:.1f}",
                f"{r['operator_rss_mb_after']:.0f}",
            )
    console.print(table)
    report = {
        "benchmark": "operator",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "load_average": {"before": load_before, "after": benchlib.load_average()},
        "versions": versions(),
        "quick": args.quick,
        "results": results,
        "notes": "API server: the emulator (ghostserve.cluster.apiserver) in the benchmark process with "
        "the tests/operator scheduler/kubelet/device-plugin stand-in; sidecars: in-process gRPC stand-ins, "
        "one per node; operator: real `ghostserve operator` subprocesses (the storm's second one started "
        "right after SIGKILL of the first). The machine was shared with other jobs: absolute times include "
        "contention.",
    }
    kind = "operator-quick" if args.quick else "operator"
    out = args.out or ROOT / "bench" / "results" / f"{kind}-{info['slug']}.json"
    return benchlib.save(out, report, console.print)


if __name__ == "__main__":
    sys.exit(main())
