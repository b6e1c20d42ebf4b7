"""`ghostserve demo --engine sglang`: the device-fault scenario with real sglang servers in the pods.

The embedded node agent runs an image whose name contains `sglang` as `.venv-sglang/bin/python -m
sglang.launch_server` (containers.ImageTable). What sglang needs to serve on this CPU travels in the
GhostServeDeployment itself, as a user would write it: CPU flags in spec.engine.args, the CPU
environment in spec.engine.env, a local HF directory in spec.model.path (a tiny random LLaMA made by
tests/sglang/tiny_model.py). `sgl_kernel` has no CPU build anywhere, so PYTHONPATH carries the
TEST-ONLY stand-in tests/sglang/standin_sgl_kernel (plain-torch versions of the two ops sglang calls
on CPU); the demo says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ghostserve.cluster import api, containers, demorun, embedded, scenarios, traffic
from rich.console import Console

SGLANG_IMAGE = "lmsysorg/sglang:v0.5.3-cpu"  # any name containing `sglang` runs .venv-sglang here
STANDIN = containers.REPO / "tests" / "sglang" / "standin_sgl_kernel"
TINY_MODEL = containers.REPO / "tests" / "sglang" / "tiny_model.py"
ENGINE_PORT = 30000  # the engine container's port (pod model, docs/design.md)
TINY_VOCAB = 384  # tests/sglang/tiny_model.VOCAB; ids 0-2 are special but harmless as prompt ids
# sglang imports for ~1 min on a quiet 2-core machine, ~3 min on a busy one; a restart after the
# fault costs that again.
START_TIMEOUT_S = 600.0
CPU_ARGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
    "--max-total-tokens", "4096", "--mem-fraction-static", "0.05", "--disable-cuda-graph",
)  # fmt: skip
# sglang decodes the tiny model at ~20 tokens/s on this CPU: 40 new tokens would end before the
# operator has even seen the fault, so the sglang demo streams at least this many.
MIN_TOKENS = 256
STANDIN_NOTE = (
    "sgl_kernel is a TEST-ONLY stand-in (tests/sglang/standin_sgl_kernel): no CPU build of it exists"
)


class Unavailable(RuntimeError):
    """The sglang environment is not installed here."""


def check_available(python: pathlib.Path | None = None) -> None:
    python = python or containers.SGLANG_PYTHON
    if not python.exists():
        raise Unavailable(
            f"--engine sglang needs {python} (run scripts/setup-sglang.sh); the default engine is reference"
        )


def cpu_env(tp: int) -> list[dict[str, str]]:
    """spec.engine.env of a CPU sglang replica (the plugin's GHOSTSERVE_* env comes from the operator)."""
    cores = os.cpu_count() or 1
    return [
        {"name": "SGLANG_USE_CPU_ENGINE", "value": "1"},
        # The CUDA torch wheel's NCCL crashes on CPU tensors; a missing library makes sglang use gloo.
        {"name": "SGLANG_NCCL_SO_PATH", "value": "/nonexistent/libnccl.so"},
        {"name": "SGLANG_CPU_OMP_THREADS_BIND", "value": "|".join(str(i % cores) for i in range(tp))},
        {"name": "PYTHONPATH", "value": str(STANDIN)},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
    ]


@dataclasses.dataclass(frozen=True)
class SglangDeployment(scenarios.Deployment):
    """A scenarios.Deployment whose pods run sglang on the CPU with the model at `model_path`."""

    model_path: str = ""

    def manifest(self) -> dict[str, Any]:
        m = super().manifest()
        m["spec"]["model"] = {"name": "tiny-llama-random", "path": self.model_path}
        m["spec"]["engine"].update(image=SGLANG_IMAGE, args=list(CPU_ARGS), env=cpu_env(self.tp))
        return m


@contextmanager
def tiny_model(python: pathlib.Path | None = None) -> Iterator[pathlib.Path]:
    """A tiny random-weight LLaMA directory (seed 0), made with .venv-sglang's python; removed after."""
    python = python or containers.SGLANG_PYTHON
    root = pathlib.Path(tempfile.mkdtemp(prefix="gs-sglang-model-", dir="/tmp"))
    path = root / "tiny-llama"
    code = (
        "import importlib.util, pathlib, sys\n"
        "spec = importlib.util.spec_from_file_location('tiny_model', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod.make(pathlib.Path(sys.argv[2]), seed=0)\n"
    )
    try:
        done = subprocess.run(
            [str(python), "-c", code, str(TINY_MODEL), str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"making the tiny model failed:\n{done.stderr[-2000:]}")
        yield path
    finally:
        shutil.rmtree(root, ignore_errors=True)


Report = Callable[..., None]


def _half_way(streams: list[traffic.Stream]) -> bool:
    """Every stream is half-way or finished (greedy decoding of a random model may hit EOS early), and
    one still decodes."""
    return all(len(s.tokens) * 2 >= s.max_new_tokens or s.finish_reason for s in streams) and any(
        not s.finish_reason for s in streams
    )


def _flush_cache(cluster: embedded.Cluster, pod_name: str) -> None:
    pod = cluster.get(api.PODS, pod_name) or {}
    url = f"http://{(pod.get('status') or {}).get('podIP')}:{ENGINE_PORT}/flush_cache"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=60) as reply:
        if reply.status != 200:
            raise RuntimeError(f"sglang {url}: HTTP {reply.status}")


def device_fault(
    console: Any,
    cluster: embedded.Cluster,
    *,
    requests: int,
    prompt: int,
    tokens: int,
    seed: int,
    code: str,
    model_path: pathlib.Path,
    report: Report,
) -> bool:
    """Deploy one TP=2 sglang replica, run fault-free, run with a fatal Xid on rank 1's GPU mid-decode
    (same-node GPU swap), print the demo's report. True when every stream's tokens match."""
    title = "sglang: device fault, healthy GPU free on the node"
    dep = SglangDeployment("sgl", tp=2, code=code, model_path=str(model_path))
    rank = 1
    console.print(f"[yellow]{STANDIN_NOTE}[/]")
    with console.status(f"{title}: deploying {dep.name} (sglang, TP={dep.tp}; sglang starts in 1-3 min)"):
        scenarios.deploy(cluster, dep, timeout_s=START_TIMEOUT_S)
        url = scenarios.gateway(cluster, dep.name)
    node, gpus = scenarios.pod_gpus(cluster, f"{dep.name}-r0")
    uuid = cluster.gpu_uuids(node)[gpus[rank]]

    def streams(tag: str) -> list[traffic.Stream]:
        return traffic.make_streams(
            requests, prompt_tokens=prompt, new_tokens=tokens, vocab=TINY_VOCAB, seed=seed, tag=f"sgl-{tag}"
        )

    with console.status(f"{title}: fault-free run ({requests} streams of {tokens} tokens)"):
        base = scenarios.stream(cluster, url, streams("ref"), timeout_s=START_TIMEOUT_S)
    # Cold cache for the run, as for the fault-free one: a prefix hit on the fault-free run's KV makes
    # sglang recompute the prompt's last page into other slots, and the plugin then serves that
    # request unprotected (docs/sglang.md "When the sidecar says no").
    _flush_cache(cluster, f"{dep.name}-r0")
    before = int(scenarios.status_of(cluster, dep.name).get("recoveries") or 0)
    with console.status(f"{title}: streaming; Xid 79 on {node} GPU {gpus[rank]} (rank {rank}) mid-decode"):
        run = scenarios.stream(
            cluster,
            url,
            streams("run"),
            fault=lambda: cluster.inject_gpu_fault(node, gpus[rank], kind="XID", xid=79),
            fault_when=_half_way,
            settle=scenarios.recovered(cluster, dep.name, before + 1),
            timeout_s=START_TIMEOUT_S,
        )
    identical = run.outputs == base.outputs
    report(
        console,
        cluster,
        title,
        dep,
        run,
        node=node,
        gpu=f"{gpus[rank]} ({uuid})",
        rank=rank,
        identical=identical,
        untouched={},
    )
    with console.status(f"{title}: deleting {dep.name}; replacing the broken GPU"):
        scenarios.undeploy(cluster, dep.name)
        cluster.repair_gpu(node, gpus[rank])
    return identical


def main(args: argparse.Namespace, console: Console, *, report: Report) -> int:
    """The sglang demo: 0 when tokens match, 1 when not or on a failure, 2 without .venv-sglang."""
    try:
        check_available()
    except Unavailable as exc:
        console.print(f"[red]ghostserve demo: {exc}[/]")
        return 2
    t0 = time.monotonic()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gs-demo-sglang-", dir="/tmp"))
    cluster = embedded.Cluster(embedded.Options(workdir=workdir, nodes=2, gpus=4))

    def body() -> bool:
        ok = False
        console.print("making the tiny random-weight LLaMA (tests/sglang/tiny_model.py, .venv-sglang)")
        with tiny_model() as path:
            with console.status("starting the embedded cluster: 2 nodes x 4 GPUs, sidecars, operator"):
                cluster.start()
            up = time.monotonic() - t0
            console.print(f"[green]cluster up[/] in {up:.1f} s (kubeconfig {cluster.kubeconfig})")
            ok = device_fault(
                console,
                cluster,
                requests=args.requests,
                prompt=args.prompt,
                tokens=max(args.tokens, MIN_TOKENS),
                seed=args.seed,
                code=args.code,
                model_path=path,
                report=report,
            )
        return ok

    return demorun.run(console, cluster, workdir=workdir, keep=args.keep, t0=t0, body=body)
