"""A cluster for operator tests: the API emulator, a scheduler + kubelet + device plugin stand-in, and
one recording sidecar stand-in PER NODE.

Everything runs in one background thread with its own event loop (the operator itself runs as a
real `ghostserve operator` subprocess against the emulator's HTTP port). There is no kubelet or
scheduler in the emulator, so `Nodes` plays them and the NVIDIA device plugin: each node has GPUs
`GPU-<node>-<i>`; binding a pod hands it `nvidia.com/gpu` healthy free GPUs (recorded in the
stand-in's own annotation, which the operator never reads), honouring required node affinity,
taints and cordons; a pod that fits nowhere gets PodScheduled=False/Unschedulable like the real
scheduler reports. `fail_gpu` marks a GPU unhealthy (allocatable drops, as the device plugin does).

Each node has its own InternalIP on loopback (127.0.10.<n+1>, contracts C2) and its own sidecar
stand-in there, on one port shared by all nodes. A running pod "attaches" its ranks to its node's
stand-in with the GPU UUIDs it was given (what the engine does), so a health event for a GPU carries
the group and rank holding it (C3), as the real sidecar stamps it.
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
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc
import grpc.aio
import kmock
from ghostserve.cluster import apiserver as kmock_ext
from ghostserve.cluster import embedded
from ghostserve.v1 import sidecar_pb2, sidecar_pb2_grpc
from kmock._internal import apps

PODS = kmock_ext.resource("v1/pods")
NODES = kmock_ext.resource("v1/nodes")
SERVICES = kmock_ext.resource("v1/services")
EVENTS = kmock_ext.resource("v1/events")
GSD = kmock_ext.resource("ghostserve.io/v1alpha1/ghostservedeployments")
REPO = pathlib.Path(__file__).resolve().parents[2]
GPUS_ANNOTATION = "harness.ghostserve.io/gpus"  # the stand-in device plugin's allocation record


def node_ip(index: int) -> str:
    return f"127.0.10.{index + 1}"


class StandInSidecar(sidecar_pb2_grpc.SidecarServicer):
    """One node's sidecar stand-in: records every call, keeps the groups the node's pods attached.

    Rebuild reports REBUILT_BYTES so the status can be checked end to end."""

    REBUILT_BYTES = 4096

    POOL_BYTES = 8192  # what each rank's pool "holds": a move sends this much per rank

    def __init__(self, node: str, peers: dict[str, StandInSidecar] | None = None) -> None:
        self.node = node
        self.peers = peers if peers is not None else {}  # "ip:port" -> that node's stand-in
        self.calls: list[tuple[str, Any, float]] = []
        self.health: asyncio.Queue[sidecar_pb2.HealthEvent] = asyncio.Queue()
        self.groups: dict[str, dict[int, str]] = {}  # group -> rank -> device uuid
        self.invalid: dict[str, set[int]] = {}
        self.fail: dict[str, int] = {}  # RPC name -> calls still to fail with UNAVAILABLE
        self.faulty: dict[str, sidecar_pb2.HealthEvent] = {}  # GPU uuid -> its fatal event

    def _log(self, name: str, request: Any) -> None:
        self.calls.append((name, request, time.monotonic()))

    async def _maybe_fail(self, name: str, context: Any) -> None:
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"injected {name} failure")

    async def MarkLost(self, request: Any, context: Any) -> Any:
        self._log("MarkLost", request)
        await self._maybe_fail("MarkLost", context)
        if request.group not in self.groups:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown group")
        self.invalid.setdefault(request.group, set()).update(request.ranks)
        return sidecar_pb2.MarkLostResponse()

    async def PlanRecovery(self, request: Any, context: Any) -> Any:
        self._log("PlanRecovery", request)
        await self._maybe_fail("PlanRecovery", context)
        if request.group not in self.groups:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown group")
        return sidecar_pb2.RecoveryPlan(
            group=request.group,
            lost_ranks=request.lost_ranks,
            requests=[sidecar_pb2.RequestPlan(request_id="req-1", total_chunks=4, recompute_chunks=1)],
        )

    async def Rebuild(self, request: Any, context: Any) -> Any:
        self._log("Rebuild", request)
        await self._maybe_fail("Rebuild", context)
        if request.group not in self.groups:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown group")
        self.invalid.pop(request.group, None)
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
        await self._maybe_fail("DeleteGroup", context)
        if self.groups.pop(request.group, None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown group")
        return sidecar_pb2.DeleteGroupResponse()

    async def MoveGroup(self, request: Any, context: Any) -> Any:
        """Source side of C3: the group's pools go to the target; idempotent (0 when already there)."""
        self._log("MoveGroup", request)
        await self._maybe_fail("MoveGroup", context)
        ranks = self.groups.get(request.group)
        target = self.peers.get(request.target)
        if ranks is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown group")
        if self.invalid.get(request.group):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a rank's pool is not valid")
        if target is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no sidecar at {request.target}")
        assert ranks is not None and target is not None  # abort raises
        if target.groups.get(request.group) is not None:
            return sidecar_pb2.MoveGroupReply()
        target.groups[request.group] = dict(ranks)
        return sidecar_pb2.MoveGroupReply(
            bytes_moved=self.POOL_BYTES * len(ranks), ranks_moved=len(ranks), requests_moved=1
        )

    async def DescribeGroup(self, request: Any, context: Any) -> Any:
        self._log("DescribeGroup", request)
        ranks = self.groups.get(request.group)
        if ranks is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown group")
            raise AssertionError("abort raises")
        bad = self.invalid.get(request.group, set())
        return sidecar_pb2.GroupDescription(
            group=request.group,
            world_size=len(ranks),
            parity_bytes=1024,
            pool_bytes=self.POOL_BYTES * len(ranks),
            ranks=[
                sidecar_pb2.RankState(rank=r, attached=True, pool_valid=r not in bad, device_uuid=u)
                for r, u in sorted(ranks.items())
            ],
            requests=[sidecar_pb2.RequestState(request_id="req-1", chunks_committed=4, chunks_protected=4)],
        )

    async def WatchHealth(self, request: Any, context: Any) -> Any:
        """Like the real sidecar: the current state of every faulty GPU first (stamped with whoever
        holds it NOW), then live events."""
        self._log("WatchHealth", request)
        if request.initial_state:
            for event in list(self.faulty.values()):
                held = self.holder(event.gpu_uuid)
                yield sidecar_pb2.HealthEvent(
                    gpu_index=event.gpu_index,
                    gpu_uuid=event.gpu_uuid,
                    kind=event.kind,
                    xid=event.xid,
                    fatal=True,
                    message=event.message,
                    node=self.node,
                    group=held[0] if held else "",
                    rank=held[1] if held else 0,
                )
        while True:
            yield await self.health.get()

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def attach(self, group: str, uuids: list[str]) -> None:
        """What the engine's Attach does: rank i of the group on the i-th GPU of its pod."""
        self.groups[group] = dict(enumerate(uuids))

    def holder(self, uuid: str) -> tuple[str, int] | None:
        for group, ranks in self.groups.items():
            for rank, held in ranks.items():
                if held == uuid:
                    return group, rank
        return None


def node_object(name: str, *, gpus: int, ip: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "capacity": {"nvidia.com/gpu": str(gpus)},
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "addresses": [{"type": "InternalIP", "address": ip}],
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


def gpus_of(pod: dict[str, Any]) -> list[str]:
    """GPU UUIDs the stand-in device plugin gave a pod (in NVIDIA_VISIBLE_DEVICES order)."""
    raw = (pod["metadata"].get("annotations") or {}).get(GPUS_ANNOTATION, "")
    return [g for g in raw.split(",") if g]


def _wanted(pod: dict[str, Any]) -> int:
    total = 0
    for c in pod["spec"].get("containers") or []:
        total += int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", "0"))
    return total


class Nodes:
    """Scheduler + kubelet + device plugin stand-in: binds pending pods to the least-allocated node
    that fits, hands them GPUs, runs them, and attaches them to their node's sidecar stand-in."""

    def __init__(self, emulator: kmock_ext.Emulator, sidecars: dict[str, StandInSidecar]) -> None:
        self.emulator = emulator
        self.sidecars = sidecars
        self.kick = asyncio.Event()
        self.auto_run = True  # False: bound pods stay Pending (to hold a recovery mid-way)
        self.todo: set[tuple[str, str]] = set()
        self.unhealthy: dict[str, set[str]] = {}

    def _used(self) -> dict[str, set[str]]:
        used: dict[str, set[str]] = {}
        for (res, _, _), obj in self.emulator.objects.items():
            if res == PODS and not obj.deleted and obj.raw["spec"].get("nodeName"):
                if obj.raw.get("status", {}).get("phase") in {"Failed", "Succeeded"}:
                    continue
                used.setdefault(obj.raw["spec"]["nodeName"], set()).update(gpus_of(obj.raw))
        return used

    def _place(
        self, pod: dict[str, Any], nodes: list[dict[str, Any]], used: dict[str, set[str]]
    ) -> tuple[str, list[str]] | None:
        want = _wanted(pod)
        options = []
        for node in nodes:
            name, spec = node["metadata"]["name"], node.get("spec") or {}
            ready = any(
                c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])
            )
            tainted = any(t.get("effect") in {"NoSchedule", "NoExecute"} for t in spec.get("taints") or [])
            if not ready or tainted or spec.get("unschedulable") or not _affinity_ok(pod, name):
                continue
            total = int(node["status"]["capacity"].get("nvidia.com/gpu", "0"))
            bad = self.unhealthy.get(name, set())
            free = [
                uuid
                for i in range(total)
                if (uuid := f"GPU-{name}-{i}") not in used.get(name, set()) and uuid not in bad
            ]
            if len(free) >= want:
                options.append((len(used.get(name, set())), name, free[:want]))
        if not options:
            return None
        _, name, gpus = min(options)
        return name, gpus

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
                    conds = pod.get("status", {}).get("conditions") or []
                    if not any(c.get("type") == "PodScheduled" for c in conds):
                        message = f"0/{len(nodes)} nodes are available: {_wanted(pod)} nvidia.com/gpu"
                        await self._write(
                            meta,
                            {
                                "status": {
                                    "phase": "Pending",
                                    "conditions": [
                                        {
                                            "type": "PodScheduled",
                                            "status": "False",
                                            "reason": "Unschedulable",
                                            "message": message,
                                        }
                                    ],
                                }
                            },
                        )
                    continue  # retried when nodes or pods change
                node, gpus = placed
                used.setdefault(node, set()).update(gpus)
                await self._write(
                    meta,
                    {
                        "metadata": {"annotations": {GPUS_ANNOTATION: ",".join(gpus)}},
                        "spec": {"nodeName": node},
                        "status": {"phase": "Pending", "conditions": []},
                    },
                )
            elif self.auto_run:
                if pod.get("status", {}).get("phase") == "Pending":
                    env = pod["spec"]["containers"][0].get("env") or []
                    group = next((e["value"] for e in env if e["name"] == "GHOSTSERVE_GROUP"), None)
                    side = self.sidecars.get(pod["spec"]["nodeName"])
                    if group and side is not None:
                        side.attach(group, gpus_of(pod))
                    await self._write(meta, running_status())
                self.todo.discard((ns, name))

    async def _write(self, meta: dict[str, Any], patch: dict[str, Any]) -> None:
        with contextlib.suppress(kmock.KubernetesError):  # deleted meanwhile
            await self.emulator.write("update", PODS, meta["namespace"], meta["name"], patch)


def running_status() -> dict[str, Any]:
    return {
        "status": {
            "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
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
    """The emulator, Nodes and one sidecar stand-in per node in a background event loop."""

    def __init__(self) -> None:
        self.sidecars: dict[str, StandInSidecar] = {}
        self.peers: dict[str, StandInSidecar] = {}  # by address, for MoveGroup between stand-ins
        self.node_names: list[str] = []
        self._grpc: list[grpc.aio.Server] = []
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
        self.nodes = Nodes(self.emulator, self.sidecars)
        self.emulator.listeners.append(self._on_write)
        self.nodes_task = asyncio.create_task(self.nodes.run())
        self.sidecar_port = free_port()  # every node's sidecar listens on it, each on its node's IP

    async def _stop(self) -> None:
        self.nodes_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.nodes_task
        for server in self._grpc:
            await server.stop(0)
        await self._stack.aclose()

    async def _serve(self, name: str, ip: str) -> None:
        side = StandInSidecar(name, self.peers)
        server = grpc.aio.server()
        sidecar_pb2_grpc.add_SidecarServicer_to_server(side, server)
        server.add_insecure_port(f"{ip}:{self.sidecar_port}")
        await server.start()
        self.sidecars[name] = side
        self.peers[f"{ip}:{self.sidecar_port}"] = side
        self._grpc.append(server)

    def add_node(self, name: str, *, gpus: int, sidecar: bool = True) -> str:
        """A node with its own loopback InternalIP and (unless sidecar=False) its own sidecar stand-in."""
        ip = node_ip(len(self.node_names))
        self.node_names.append(name)
        if sidecar:
            self.call(lambda: self._serve(name, ip))
        self.write("create", NODES, None, None, node_object(name, gpus=gpus, ip=ip))
        return ip

    def fail_gpu(self, node: str, uuid: str, *, xid: int = 79, report: bool = True) -> None:
        """A fatal GPU fault: the device plugin marks it unhealthy (allocatable drops) and, with
        `report`, the node's sidecar streams the Xid with the group/rank attached to that GPU."""

        async def fail() -> None:
            self.nodes.unhealthy.setdefault(node, set()).add(uuid)
            raw = self.emulator.objects[(NODES, None, node)].raw
            total = int(raw["status"]["capacity"]["nvidia.com/gpu"])
            left = str(total - len(self.nodes.unhealthy[node]))
            patch = {"status": {"allocatable": {"nvidia.com/gpu": left}}}
            await self.emulator.write("update", NODES, None, node, patch)
            if report:
                side = self.sidecars[node]
                held = side.holder(uuid)
                side.faulty[uuid] = event = sidecar_pb2.HealthEvent(
                    gpu_index=int(uuid.rsplit("-", 1)[1]),
                    gpu_uuid=uuid,
                    kind=sidecar_pb2.XID,
                    xid=xid,
                    fatal=True,
                    message="GPU has fallen off the bus",
                    node=node,
                    group=held[0] if held else "",
                    rank=held[1] if held else 0,
                )
                side.health.put_nowait(event)

        self.call(fail)

    def calls(self, name: str | None = None) -> list[tuple[str, str, Any]]:
        """(node, rpc, request) of every sidecar call, in time order across nodes."""
        found = [(t, node, n, r) for node, side in self.sidecars.items() for n, r, t in side.calls]
        ordered = sorted(found, key=lambda x: x[0])
        return [(node, n, r) for _, node, n, r in ordered if name is None or n == name]

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
        return embedded.wait_on_writes(
            self.changed,
            lambda: self.version,
            check,
            timeout=timeout,
            failure=lambda: AssertionError(f"timed out waiting for {what}; cluster state:\n{self.dump()}"),
        )

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
                        "gpus": gpus_of(obj),
                    },
                    sort_keys=True,
                )
            )
        return "\n".join(lines)

    def push_health(self, node: str, event: sidecar_pb2.HealthEvent) -> None:
        self.loop.call_soon_threadsafe(self.sidecars[node].health.put_nowait, event)

    def kubeconfig(self, path: pathlib.Path) -> pathlib.Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
            f"clusters: [{{name: emu, cluster: {{server: 'http://127.0.0.1:{self.server.port}'}}}}]\n"
            "users: [{name: emu, user: {token: test-token}}]\n"
            "contexts: [{name: emu, context: {cluster: emu, user: emu, namespace: test}}]\n"
        )
        return path


def cluster_of(nodes: int, gpus: int) -> Iterator[Cluster]:
    """An emulated cluster of `nodes` nodes n0, n1, ... with `gpus` GPUs each (a fixture body)."""
    with Cluster() as c:
        for i in range(nodes):
            c.add_node(f"n{i}", gpus=gpus)
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`ghostserve operator` as a real subprocess; `kill()` sends SIGKILL."""

    metrics_url = ""
    liveness_url = ""

    def __init__(
        self,
        kubeconfig: pathlib.Path,
        log: pathlib.Path,
        *extra: str,
        sidecar_port: int = 7443,
        crash_at: str | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> None:
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
        env.pop("GHOSTSERVE_OPERATOR_CRASH_AT", None)
        env.pop("GHOSTSERVE_GATEWAY_IMAGE", None)
        env.update(env_extra or {})
        if crash_at:
            env["GHOSTSERVE_OPERATOR_CRASH_AT"] = crash_at
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
                "{node_ip}:{port}",
                "--sidecar-port",
                str(sidecar_port),
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

    def killed_itself(self, timeout: float) -> bool:
        """Wait for the process to die of its own SIGKILL (a crash point); False if it still runs."""
        try:
            return self.proc.wait(timeout=timeout) == -signal.SIGKILL
        except subprocess.TimeoutExpired:
            return False

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

    def __init__(
        self,
        workdir: pathlib.Path,
        *,
        node: str,
        gpus: int = 2,
        ip: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.address = f"{ip}:{self.port}"
        self.prefix = f"gs-op{secrets.token_hex(3)}-"
        self.log = workdir / f"sidecar-{node}.log"
        state = workdir / f"sidecar-state-{node}"
        state.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "ghostserve.cli.main",
            "sidecar",
            "--listen",
            self.address,
            "--insecure",
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
