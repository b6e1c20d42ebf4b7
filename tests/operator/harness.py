"""A cluster for operator tests: the API emulator, a scheduler+kubelet stand-in, a sidecar stand-in.

Everything runs in one background thread with its own event loop (the operator itself runs as a
real `ghostserve operator` subprocess against the emulator's HTTP port). There is no kubelet or
scheduler in the emulator, so `Nodes` plays both: it binds pending rank pods to nodes (honouring
node affinity, taints, cordons, GPU capacity and the avoid-gpus annotation) and marks them Running.
The sidecar stand-in is a real gRPC server implementing the generated servicer that records calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc.aio
import kmock
from ghostserve.cluster import apiserver as kmock_ext
from ghostserve.v1 import sidecar_pb2, sidecar_pb2_grpc
from kmock._internal import apps

PODS = kmock_ext.resource("v1/pods")
NODES = kmock_ext.resource("v1/nodes")
SERVICES = kmock_ext.resource("v1/services")
EVENTS = kmock_ext.resource("v1/events")
GSD = kmock_ext.resource("ghostserve.io/v1alpha1/ghostservedeployments")
REPO = pathlib.Path(__file__).resolve().parents[2]


class StandInSidecar(sidecar_pb2_grpc.SidecarServicer):
    """Records every call; Rebuild reports a fixed amount so the status can be checked end to end."""

    REBUILT_BYTES = 4096

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, float]] = []
        self.health: asyncio.Queue[sidecar_pb2.HealthEvent] = asyncio.Queue()

    def _log(self, name: str, request: Any) -> None:
        self.calls.append((name, request, time.monotonic()))

    async def MarkLost(self, request: Any, context: Any) -> Any:
        self._log("MarkLost", request)
        return sidecar_pb2.MarkLostResponse()

    async def PlanRecovery(self, request: Any, context: Any) -> Any:
        self._log("PlanRecovery", request)
        return sidecar_pb2.RecoveryPlan(
            group=request.group,
            lost_ranks=request.lost_ranks,
            requests=[sidecar_pb2.RequestPlan(request_id="req-1", total_chunks=4, recompute_chunks=1)],
        )

    async def Rebuild(self, request: Any, context: Any) -> Any:
        self._log("Rebuild", request)
        return sidecar_pb2.RebuildReport(
            group=request.group,
            bytes_rebuilt=self.REBUILT_BYTES,
            seconds=0.01,
            requests=[
                sidecar_pb2.RequestRebuild(
                    request_id="req-1", rebuilt_chunks=[1, 2, 3], bytes_rebuilt=self.REBUILT_BYTES
                )
            ],
        )

    async def DeleteGroup(self, request: Any, context: Any) -> Any:
        self._log("DeleteGroup", request)
        return sidecar_pb2.DeleteGroupResponse()

    async def DescribeGroup(self, request: Any, context: Any) -> Any:
        self._log("DescribeGroup", request)
        return sidecar_pb2.GroupDescription(
            group=request.group,
            parity_bytes=1024,
            requests=[sidecar_pb2.RequestState(request_id="req-1", chunks_committed=4, chunks_protected=4)],
        )

    async def WatchHealth(self, request: Any, context: Any) -> Any:
        self._log("WatchHealth", request)
        while True:
            yield await self.health.get()

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


def node_object(name: str, *, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "capacity": {"nvidia.com/gpu": str(gpus)},
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _affinity_ok(pod: dict[str, Any], node: str) -> bool:
    required = ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    for term in required.get("nodeSelectorTerms") or []:
        for expr in term.get("matchExpressions") or []:
            inside = node in expr["values"]
            if (expr["operator"] == "In" and not inside) or (expr["operator"] == "NotIn" and inside):
                return False
    return True


def _preferred(pod: dict[str, Any]) -> set[str]:
    prefs = ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
        "preferredDuringSchedulingIgnoredDuringExecution"
    ) or []
    return {v for p in prefs for e in p["preference"]["matchExpressions"] for v in e["values"]}


class Nodes:
    """Scheduler + kubelet stand-in: binds pending pods (least-allocated node first) and runs them."""

    def __init__(self, emulator: kmock_ext.Emulator) -> None:
        self.emulator = emulator
        self.kick = asyncio.Event()
        self.auto_run = True  # False: bound pods stay Pending (to hold a recovery mid-way)
        self.todo: set[tuple[str, str]] = set()

    def _used(self) -> dict[str, set[str]]:
        used: dict[str, set[str]] = {}
        for (res, _, _), obj in self.emulator.objects.items():
            if res == PODS and not obj.deleted and obj.raw["spec"].get("nodeName"):
                if obj.raw.get("status", {}).get("phase") in {"Failed", "Succeeded"}:
                    continue
                gpu = obj.raw["metadata"].get("annotations", {}).get("ghostserve.io/gpu")
                used.setdefault(obj.raw["spec"]["nodeName"], set()).add(gpu or "?")
        return used

    def _place(
        self, pod: dict[str, Any], nodes: list[dict[str, Any]], used: dict[str, set[str]]
    ) -> tuple[str, str] | None:
        avoid = set(
            filter(
                None, pod["metadata"].get("annotations", {}).get("ghostserve.io/avoid-gpus", "").split(",")
            )
        )
        options = []
        for node in nodes:
            name, spec = node["metadata"]["name"], node.get("spec") or {}
            ready = any(
                c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])
            )
            tainted = any(t.get("effect") in {"NoSchedule", "NoExecute"} for t in spec.get("taints") or [])
            if not ready or tainted or spec.get("unschedulable") or not _affinity_ok(pod, name):
                continue
            total = int(node["status"]["allocatable"].get("nvidia.com/gpu", "0"))
            free = [
                str(i) for i in range(total) if str(i) not in used.get(name, set()) and str(i) not in avoid
            ]
            if free:
                options.append((name not in _preferred(pod), len(used.get(name, set())), name, free[0]))
        if not options:
            return None
        _, _, name, gpu = min(options)
        return name, gpu

    async def run(self) -> None:
        while True:
            await self.kick.wait()
            self.kick.clear()
            await self.step()

    def note(self, action: str, resource: Any, raw: dict[str, Any]) -> None:
        """Remember pods that may need binding or starting (called on every emulator write)."""
        pod = resource == PODS and action != "delete"
        if pod and (not raw["spec"].get("nodeName") or (raw.get("status") or {}).get("phase") == "Pending"):
            self.todo.add((raw["metadata"]["namespace"], raw["metadata"]["name"]))
        if resource in (PODS, NODES):
            self.kick.set()

    async def step(self) -> None:
        objects = self.emulator.objects
        nodes = [o.raw for (res, _, _), o in objects.items() if res == NODES and not o.deleted]  # read only
        used = self._used()
        for ns, name in sorted(self.todo):
            key = (PODS, ns, name)
            if (
                key not in objects
                or objects[key].deleted
                or objects[key].raw["metadata"].get("deletionTimestamp")
            ):
                self.todo.discard((ns, name))
                continue
            pod = copy.deepcopy(objects[key].raw)
            meta = pod["metadata"]
            if not pod["spec"].get("nodeName"):
                placed = self._place(pod, nodes, used)
                if placed is None:
                    continue  # retried when nodes or pods change
                node, gpu = placed
                used.setdefault(node, set()).add(gpu)
                await self._write(
                    meta,
                    {
                        "metadata": {"annotations": {"ghostserve.io/gpu": gpu}},
                        "spec": {"nodeName": node},
                        "status": {"phase": "Pending"},
                    },
                )
            elif self.auto_run:
                if pod.get("status", {}).get("phase") == "Pending":
                    await self._write(meta, running_status())
                self.todo.discard((ns, name))

    async def _write(self, meta: dict[str, Any], patch: dict[str, Any]) -> None:
        with contextlib.suppress(kmock.KubernetesError):  # deleted meanwhile
            await self.emulator.write("update", PODS, meta["namespace"], meta["name"], patch)


def running_status() -> dict[str, Any]:
    return {
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {
                    "name": "engine",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                }
            ],
        }
    }


class Cluster:
    """The emulator, Nodes and the sidecar stand-in in a background event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.changed = threading.Condition()
        self.version = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._stack = contextlib.AsyncExitStack()

    def __enter__(self) -> Cluster:
        self._thread.start()
        self.call(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    async def _start(self) -> None:
        self.emulator = await self._stack.enter_async_context(kmock_ext.Emulator())
        kmock_ext.declare(self.emulator)
        self.server = await self._stack.enter_async_context(apps.Server(self.emulator))
        self.nodes = Nodes(self.emulator)
        self.emulator.listeners.append(self._on_write)
        self.nodes_task = asyncio.create_task(self.nodes.run())
        self.sidecar = StandInSidecar()
        self.grpc_server = grpc.aio.server()
        sidecar_pb2_grpc.add_SidecarServicer_to_server(self.sidecar, self.grpc_server)
        self.sidecar_port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        await self.grpc_server.start()

    async def _stop(self) -> None:
        self.nodes_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.nodes_task
        await self.grpc_server.stop(0)
        await self._stack.aclose()

    def _on_write(self, action: str, resource: Any, raw: dict[str, Any]) -> None:
        self.nodes.note(action, resource, raw)
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    # ---- test-side API (called from the test thread) --------------------------------------------
    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def write(
        self, action: str, resource: Any, namespace: str | None, name: str | None, data: Any = None
    ) -> None:
        self.call(lambda: self.emulator.write(action, resource, namespace, name, data))

    def get(self, resource: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
        async def read() -> dict[str, Any] | None:
            key = (resource, namespace, name)
            if key not in self.emulator.objects or self.emulator.objects[key].deleted:
                return None
            return copy.deepcopy(self.emulator.objects[key].raw)

        return self.call(read)

    def list(self, resource: Any, namespace: str | None = None) -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            return [
                copy.deepcopy(o.raw)
                for (res, ns, _), o in self.emulator.objects.items()
                if res == resource and not o.deleted and (namespace is None or ns == namespace)
            ]

        return self.call(read)

    def count_phase(self, resource: Any, namespace: str, phase: str) -> int:
        """How many objects have status.phase == `phase` (no copies: cheap enough to poll at scale)."""

        async def count() -> int:
            return sum(
                1
                for (res, ns, _), o in self.emulator.objects.items()
                if res == resource
                and ns == namespace
                and not o.deleted
                and (o.last.raw.get("status") or {}).get("phase") == phase
            )

        return self.call(count)

    def wait_for(self, check: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition") -> Any:
        """Re-evaluate `check` after every write to the emulator until it is truthy or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            with self.changed:
                seen = self.version
            result = check()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; cluster state:\n{self.dump()}")
            with self.changed:
                self.changed.wait_for(lambda seen=seen: self.version != seen, timeout=min(left, 1.0))  # type: ignore[misc]

    def dump(self) -> str:
        """Deployments and pods, compactly: what a failed wait needs to explain itself."""
        lines = []
        for obj in self.list(GSD):
            lines.append(json.dumps({"meta": obj["metadata"], "status": obj.get("status")}, sort_keys=True))
        lines.append("errors: " + " | ".join(repr(e)[:200] for e in self.emulator.errors))
        for obj in self.list(PODS):
            lines.append(
                json.dumps(
                    {
                        "name": obj["metadata"]["name"],
                        "uid": obj["metadata"]["uid"],
                        "node": obj["spec"].get("nodeName"),
                        "status": obj.get("status"),
                        "annotations": obj["metadata"].get("annotations"),
                    },
                    sort_keys=True,
                )
            )
        return "\n".join(lines)

    def push_health(self, event: sidecar_pb2.HealthEvent) -> None:
        self.loop.call_soon_threadsafe(self.sidecar.health.put_nowait, event)

    def kubeconfig(self, path: pathlib.Path) -> pathlib.Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
            f"clusters: [{{name: emu, cluster: {{server: 'http://127.0.0.1:{self.server.port}'}}}}]\n"
            "users: [{name: emu, user: {token: test-token}}]\n"
            "contexts: [{name: emu, context: {cluster: emu, user: emu, namespace: test}}]\n"
        )
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`ghostserve operator` as a real subprocess; `kill()` sends SIGKILL."""

    metrics_url = ""
    liveness_url = ""

    def __init__(self, kubeconfig: pathlib.Path, log: pathlib.Path, *extra: str) -> None:
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ghostserve.cli.main",
                "operator",
                "--namespace",
                "test",
                "--sidecar-address-template",
                "127.0.0.1:{port}",
                "--log-format",
                "plain",
                "--resync-seconds",
                "5",
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()
        return int(self.proc.returncode)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class RealSidecar:
    """`ghostserve sidecar` as a process on loopback TCP with fake NVML, named as node `node`."""

    def __init__(self, workdir: pathlib.Path, *, node: str, gpus: int = 2) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.prefix = f"gs-op{secrets.token_hex(3)}-"
        self.log = workdir / "sidecar.log"
        state = workdir / "sidecar-state"
        state.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "ghostserve.cli.main",
            "sidecar",
            "--listen",
            self.address,
            "--fake-nvml",
            str(gpus),
            "--node",
            node,
            "--grace",
            "2",
            "--shm-prefix",
            self.prefix,
            "--state-dir",
            str(state),
            "--budget",
            "64MiB",
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def client(self) -> Any:
        from ghostserve.sidecar import client

        return client.SidecarClient(self.address, timeout=10.0)

    def wait_ready(self, timeout: float = 30.0) -> None:
        with self.client() as c:
            c.wait_ready(timeout=timeout)

    def stop(self) -> list[str]:
        """SIGTERM and wait; returns the shared-memory segments it left behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        return sorted(p.name for p in pathlib.Path("/dev/shm").glob(self.prefix + "*"))
