"""Fault scenarios on the embedded cluster, shared by the demo, tests/cluster and bench/cluster.py.

A scenario deploys one GhostServeDeployment of the reference engine, streams long requests through
the resume gateway, injects one fault mid-decode (when every stream has half its tokens), lets the
operator recover, and returns what the client received plus a timeline of what the API server saw:
every write is stamped as it happens (status steps, Events, pod phases), so each step's time comes
from the operator's status and Events, not from the injector.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from ghostserve.cluster import api, embedded, traffic

GSD = embedded.GSD
REFERENCE_IMAGE = "ghostserve/reference-engine:dev"
GATEWAY_IMAGE = "ghcr.io/ghostserve/ghostserve:dev"
GATEWAY_PORT = 8000
DEMO_MODEL = "ghostserve/tiny-llama-demo"
DEMO_VOCAB = 1024


@dataclasses.dataclass(frozen=True)
class Deployment:
    name: str
    tp: int
    code: str = "xor"
    chunk_tokens: int = 16
    page_size: int = 16
    model: str = DEMO_MODEL
    replicas: int = 1

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "ghostserve.io/v1alpha1",
            "kind": "GhostServeDeployment",
            "metadata": {"name": self.name},
            "spec": {
                "model": {"name": self.model},
                "engine": {"image": REFERENCE_IMAGE, "tensorParallel": self.tp, "replicas": self.replicas},
                "protection": {
                    "code": self.code,
                    "parityShards": 2 if self.code in {"rdp", "rs"} else 1,
                    "chunkTokens": self.chunk_tokens,
                    "pageSize": self.page_size,
                },
                "recovery": {"backoffSeconds": 0},
            },
        }


@dataclasses.dataclass
class Write:
    at: float  # time.time() when the API server applied it
    action: str
    plural: str
    obj: dict[str, Any]


class Recorder:
    """Every write the API server applies, stamped; installed as an emulator listener."""

    def __init__(self, cluster: embedded.Cluster) -> None:
        self.writes: list[Write] = []
        self._cluster = cluster
        cluster.call(self._install)

    async def _install(self) -> None:
        self._cluster.emulator.listeners.append(self._note)

    def _note(self, action: str, resource: Any, raw: dict[str, Any]) -> None:
        if resource.plural in {"pods", "events", "ghostservedeployments", "nodes"}:
            self.writes.append(Write(time.time(), action, resource.plural, copy.deepcopy(raw)))

    def close(self) -> None:
        async def remove() -> None:
            self._cluster.emulator.listeners.remove(self._note)

        self._cluster.call(remove)

    def since(self, t: float) -> list[Write]:
        return [w for w in list(self.writes) if w.at >= t]


def status_of(cluster: embedded.Cluster, name: str) -> dict[str, Any]:
    return dict((cluster.get(GSD, name) or {}).get("status") or {})


def engine_pods(cluster: embedded.Cluster, name: str) -> list[dict[str, Any]]:
    return [
        p
        for p in cluster.list(api.PODS)
        if (p["metadata"].get("labels") or {}).get("ghostserve.io/deployment") == name
        and (p["metadata"].get("labels") or {}).get("app.kubernetes.io/component", "engine") == "engine"
    ]


def allocatable(cluster: embedded.Cluster, node: str) -> int:
    return int(
        ((cluster.get(api.NODES, node) or {}).get("status") or {})
        .get("allocatable", {})
        .get("nvidia.com/gpu", 0)
    )


def pod_gpus(cluster: embedded.Cluster, pod_name: str) -> tuple[str, list[int]]:
    """(node, GPU indexes) the device plugin gave a running pod (rank i on the i-th)."""
    for node in cluster.nodes.values():
        for run in node.kubelet.runs.values():
            if run.pod["metadata"]["name"] == pod_name and not run.stopping:
                return node.spec.name, [g.index for g in run.gpus]
    raise LookupError(f"pod {pod_name} is not running on any node")


def deploy(cluster: embedded.Cluster, dep: Deployment, *, timeout_s: float = 180.0) -> None:
    """Apply the deployment and wait until it serves (phase Serving, every replica pod Ready)."""
    cluster.apply(dep.manifest())
    cluster.wait_for(
        lambda: status_of(cluster, dep.name).get("phase") == "Serving",
        timeout=timeout_s,
        what=f"{dep.name} Serving",
    )


def undeploy(cluster: embedded.Cluster, name: str, *, timeout_s: float = 120.0) -> None:
    """Delete the deployment (the operator's finalizer frees its sidecar groups) and wait for its pods."""
    cluster.delete(GSD, name)
    cluster.wait_for(
        lambda: cluster.get(GSD, name) is None and not engine_pods(cluster, name),
        timeout=timeout_s,
        what=f"{name} and its pods gone",
    )
    for pod in cluster.list(api.PODS):
        if pod["metadata"]["name"] == f"{name}-gw":
            cluster.delete(api.PODS, pod["metadata"]["name"])
    cluster.wait_for(
        lambda: cluster.get(api.PODS, f"{name}-gw") is None, timeout=timeout_s, what="gateway gone"
    )


def gateway(cluster: embedded.Cluster, name: str, *, timeout_s: float = 120.0) -> str:
    """URL of the deployment's resume gateway: the operator's gateway pod when it made one, else one
    started here (the same `ghostserve gateway --selector ...` pod)."""

    def find() -> dict[str, Any] | None:
        for p in cluster.list(api.PODS):
            labels = p["metadata"].get("labels") or {}
            ours = p["metadata"]["name"] == f"{name}-gw"
            operators = labels.get("ghostserve.io/deployment") == name and (
                labels.get("app.kubernetes.io/component") == "gateway"
            )
            if ours or operators:
                return p
        return None

    if find() is None:
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{name}-gw",
                    "labels": {"app.kubernetes.io/name": "ghostserve-gateway"},
                },
                "spec": {
                    "restartPolicy": "Always",
                    # On the control-plane node (when the cluster has one): it outlives any GPU node.
                    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}],
                    "affinity": {
                        "nodeAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "preference": {
                                        "matchExpressions": [
                                            {
                                                "key": "node-role.kubernetes.io/control-plane",
                                                "operator": "Exists",
                                            }
                                        ]
                                    },
                                }
                            ]
                        }
                    },
                    "containers": [
                        {
                            "name": "gateway",
                            "image": GATEWAY_IMAGE,
                            "command": ["ghostserve", "gateway"],
                            "args": [
                                "--listen",
                                f"0.0.0.0:{GATEWAY_PORT}",
                                "--selector",
                                f"ghostserve.io/deployment={name},app.kubernetes.io/component=engine",
                                "--namespace",
                                cluster.options.namespace,
                            ],
                            "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
                        }
                    ],
                },
            }
        )
    pod = cluster.wait_for(
        lambda: (p := find()) and (p.get("status") or {}).get("podIP") and p,
        timeout=timeout_s,
        what="gateway pod",
    )
    port = next(
        (int(x["containerPort"]) for c in pod["spec"]["containers"] for x in c.get("ports") or []),
        GATEWAY_PORT,
    )
    url = f"http://{pod['status']['podIP']}:{port}"
    asyncio.run(traffic.wait_healthy(url, timeout_s=timeout_s))
    return url


@dataclasses.dataclass
class Outcome:
    streams: list[traffic.Stream]
    fault_at: float | None  # time.time() of the injection
    writes: list[Write]
    seconds: float

    @property
    def outputs(self) -> dict[str, list[int]]:
        return {s.rid.rsplit("-", 1)[1]: s.tokens for s in self.streams}


def stream(
    cluster: embedded.Cluster,
    url: str,
    streams: list[traffic.Stream],
    *,
    fault: Callable[[], None] | None = None,
    fault_fraction: float = 0.5,
    fault_when: Callable[[list[traffic.Stream]], bool] | None = None,
    settle: Callable[[], bool] | None = None,
    timeout_s: float = 600.0,
) -> Outcome:
    """Run `streams` through the gateway; call `fault` (in a thread) once every stream got
    `fault_fraction` of its tokens, or once `fault_when(streams)` (called on every token) says so;
    afterwards wait for `settle` (e.g. the recovery recorded)."""
    recorder = Recorder(cluster)
    fired = threading.Event()
    fault_at: list[float] = []
    errors: list[BaseException] = []

    def fire() -> None:
        fault_at.append(time.time())
        try:
            assert fault is not None
            fault()
        except BaseException as exc:  # surfaced after the streams end
            errors.append(exc)

    def on_token() -> None:
        if fault is None or fired.is_set():
            return
        if fault_when is not None:
            due = fault_when(streams)
        else:
            due = all(len(s.tokens) >= max(1, int(s.max_new_tokens * fault_fraction)) for s in streams)
        if due:
            fired.set()
            threading.Thread(target=fire, name="gs-fault", daemon=True).start()

    t0 = time.time()
    try:
        asyncio.run(traffic.run(url, streams, on_token=on_token, timeout_s=timeout_s))
        if errors:
            raise errors[0]
        if settle is not None:
            cluster.wait_for(settle, timeout=timeout_s, what="recovery settled")
    finally:
        recorder.close()
    return Outcome(streams, fault_at[0] if fault_at else None, recorder.writes, time.time() - t0)


def recovered(cluster: embedded.Cluster, name: str, count: int) -> Callable[[], bool]:
    """Settled once `status.recoveries` reached `count` and nothing is in flight."""

    def check() -> bool:
        st = status_of(cluster, name)
        return (
            int(st.get("recoveries") or 0) >= count
            and not st.get("inFlight")
            and bool(st.get("lastRecovery"))
        )

    return check
