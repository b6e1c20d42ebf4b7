"""The embedded cluster: API emulator, scheduler, simulated GPU nodes and the real operator, in one place.

`Cluster` runs the control plane in a background event loop (thread) and offers a synchronous API to
the CLI, the demo, tests and benchmarks: apply objects, read them, wait on them, inject faults.
What is real and what is a named stand-in: docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import dataclasses
import functools
import logging
import pathlib
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from ghostserve.cluster import api as api_mod
from ghostserve.cluster import apiserver, chart, containers, processes, scheduler
from ghostserve.cluster import node as node_mod
from ghostserve.sidecar import client as client_mod
from kmock._internal import apps

log = logging.getLogger("ghostserve.cluster")
GSD = apiserver.resource("ghostserve.io/v1alpha1/ghostservedeployments")
SIDECAR_PORT = 7443


def _moved_on(version: Callable[[], int], seen: int) -> bool:
    return version() != seen


def wait_on_writes(
    changed: threading.Condition,
    version: Callable[[], int],
    check: Callable[[], Any],
    *,
    timeout: float,
    failure: Callable[[], Exception],
) -> Any:
    """Re-evaluate `check` after every write `changed` announces (and at least every second) until it is
    truthy; raises `failure()` at the deadline. Shared by every front-end of the API emulator."""
    deadline = time.monotonic() + timeout
    while True:
        with changed:
            seen = version()
        result = check()
        if result:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            raise failure()
        with changed:
            changed.wait_for(functools.partial(_moved_on, version, seen), timeout=min(left, 1.0))


@dataclasses.dataclass(frozen=True)
class Options:
    workdir: pathlib.Path
    nodes: int = 2
    gpus: int = 4
    namespace: str = "default"
    # Loopback block: nodes get <prefix>.10.<n+1>, pods <prefix>.20.<k>. None: 127.<random>, so two
    # clusters on one machine do not collide.
    ip_prefix: str | None = None
    operator: bool = True
    # A GPU-less control-plane node (tainted NoSchedule) where the gateways the scenarios start run, so
    # a GPU node's death does not take the client's gateway with it.
    control_plane: bool = True
    operator_args: tuple[str, ...] = ()
    images: containers.ImageTable = dataclasses.field(default_factory=containers.ImageTable)


class Cluster:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.workdir = options.workdir
        self.prefix = options.ip_prefix or f"127.{random.randint(1, 254)}"
        self.tag = f"{random.getrandbits(24):06x}"
        self.shm_prefix = f"gs-c{self.tag}-"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gs-cluster", daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self.changed = threading.Condition()
        self.version = 0
        self.nodes: dict[str, node_mod.Node] = {}
        self.operator: processes.Process | None = None
        self.operator_starts = 0
        self._next_pod_ip = 0
        self.kubeconfig = self.workdir / "kubeconfig"
        self._tasks: list[asyncio.Task[Any]] = []

    # ---- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start everything. Raises RuntimeError (e.g. a workdir too long for Unix socket paths)."""
        longest = self.workdir.resolve() / "nodes" / "control-plane" / node_mod.SOCKET_DIR / "sidecar.sock"
        if len(str(longest)) > 100:  # sun_path holds 107 bytes
            raise RuntimeError(
                f"workdir {self.workdir} is too long for the nodes' Unix sockets: use a shorter one"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        try:
            self.call(self._start, timeout=180)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything; raises RuntimeError naming any /dev/shm segment left behind."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.call(self._stop, timeout=120)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
        left = sorted(p.name for p in pathlib.Path("/dev/shm").glob(self.shm_prefix + "*"))
        for name in left:
            with contextlib.suppress(OSError):
                (pathlib.Path("/dev/shm") / name).unlink()
        if left:
            raise RuntimeError(f"shared-memory segments left behind (removed now): {left}")

    async def _start(self) -> None:
        emulator = apiserver.Emulator(namespaces=[self.options.namespace], graceful_pods=True)
        self.emulator = await self._stack.enter_async_context(emulator)
        apiserver.declare(self.emulator)
        self.emulator.resources[chart.CRDS] = apiserver.kmock.ResourceInfo(
            kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
            verbs=["list", "watch", "get", "create", "delete", "patch"],
        )  # fmt: skip
        self.emulator.listeners.append(self._on_write)
        self.server = await self._stack.enter_async_context(apps.Server(self.emulator))
        self._write_kubeconfig()
        self.api = api_mod.Api(self.emulator)
        for crd in chart.crds():
            await self.api.create(apiserver.resource(chart.CRDS), crd)
        self.scheduler = scheduler.Scheduler(self.api)
        self._tasks.append(asyncio.create_task(self.scheduler.run()))
        specs = []
        if self.options.control_plane:
            specs.append(
                node_mod.NodeSpec(
                    name="control-plane",
                    ip=f"{self.prefix}.10.250",
                    gpus=0,
                    root=self.workdir / "nodes" / "control-plane",
                    shm_prefix=f"{self.shm_prefix}cp-",
                    sidecar_port=SIDECAR_PORT,
                    control_plane=True,
                )
            )
        for i in range(self.options.nodes):
            spec = node_mod.NodeSpec(
                name=f"node-{i}",
                ip=f"{self.prefix}.10.{i + 1}",
                gpus=self.options.gpus,
                root=self.workdir / "nodes" / f"node-{i}",
                shm_prefix=f"{self.shm_prefix}n{i}-",
                sidecar_port=SIDECAR_PORT,
            )
            specs.append(spec)
        for spec in specs:
            self.nodes[spec.name] = node_mod.Node(
                spec,
                api=self.api,
                take_ip=self._take_pod_ip,
                images=self.options.images,
                kubeconfig=self.kubeconfig,
                uuid_namespace=f"ghostserve-{self.tag}",
            )
        await asyncio.gather(*(n.start() for n in self.nodes.values()))
        if self.options.operator:
            await self._start_operator()

    async def _stop(self) -> None:
        if self.operator is not None:
            await self.operator.stop(10.0)
        await asyncio.gather(*(n.stop() for n in self.nodes.values()), return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await self._stack.aclose()

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: ghostserve-embedded\n"
            "clusters: [{name: ghostserve-embedded, cluster: "
            f"{{server: 'http://127.0.0.1:{self.server.port}'}}}}]\n"
            "users: [{name: admin, user: {token: embedded}}]\n"
            "contexts: [{name: ghostserve-embedded, context: {cluster: ghostserve-embedded, user: admin, "
            f"namespace: {self.options.namespace}}}}}]\n"
        )

    def _take_pod_ip(self) -> str:
        self._next_pod_ip += 1
        n = self._next_pod_ip
        return f"{self.prefix}.{20 + n // 250}.{n % 250 + 1}"

    def _on_write(self, action: str, resource: Any, raw: dict[str, Any]) -> None:
        if resource in (api_mod.PODS, api_mod.NODES):
            self.scheduler.kick.set()
            for n in self.nodes.values():
                n.kubelet.kick.set()
        if resource == chart_crds() and action == "create":
            self.emulator.resources.update(chart.resource_infos(raw))
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    # ---- the operator -------------------------------------------------------------------------
    async def _start_operator(self, crash_at: str | None = None) -> None:
        argv = [
            sys.executable, "-m", "ghostserve.cli.main", "operator",
            "--namespace", self.options.namespace,
            "--sidecar-address-template", "{node_ip}:{port}",
            "--log-format", "plain",
            *self.options.operator_args,
        ]  # fmt: skip
        env = dict(node_mod._env(), KUBECONFIG=str(self.kubeconfig))
        if crash_at:  # the operator SIGKILLs itself there (operator/ghostserve/operator/crashpoints.py)
            env["GHOSTSERVE_OPERATOR_CRASH_AT"] = crash_at
        self.operator = processes.Process(argv, env=env, cwd=self.workdir, log=self.workdir / "operator.log")
        self.operator.start()
        self.operator_starts += 1

    def kill_operator(self) -> None:
        """SIGKILL the operator process (its Deployment stand-in does not restart it: `start_operator`)."""
        assert self.operator is not None
        self.call(lambda: self.operator.stop(0))  # type: ignore[union-attr]

    def start_operator(self, *, crash_at: str | None = None) -> None:
        """Start a new operator process; with `crash_at` it SIGKILLs itself at that crash point."""
        self.call(lambda: self._start_operator(crash_at))

    def wait_operator_exit(self, timeout: float) -> int:
        """Exit status of the operator process once it ends (negative: killed by that signal)."""
        assert self.operator is not None
        operator = self.operator
        return int(self.call(operator.wait, timeout=timeout))

    # ---- synchronous API ----------------------------------------------------------------------
    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def apply(self, obj: dict[str, Any]) -> None:
        """Create an object (namespace defaults to the cluster's). Raises kmock.KubernetesError."""
        obj = copy.deepcopy(obj)
        kind = resource_of(obj)
        if self.emulator.resources[kind].namespaced:
            obj.setdefault("metadata", {}).setdefault("namespace", self.options.namespace)
        self.call(lambda: self.api.create(kind, obj))

    def get(self, resource: Any, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        ns = None if resource == api_mod.NODES else namespace or self.options.namespace
        return self.call(lambda: _async(self.api.get(resource, ns, name)))

    def list(self, resource: Any, namespace: str | None = None) -> builtins.list[dict[str, Any]]:
        return self.call(lambda: _async(self.api.list(resource, namespace)))

    def patch(self, resource: Any, name: str, patch: Any, namespace: str | None = None) -> bool:
        ns = None if resource == api_mod.NODES else namespace or self.options.namespace
        return bool(self.call(lambda: self.api.patch(resource, ns, name, patch)))

    def delete(self, resource: Any, name: str, namespace: str | None = None) -> bool:
        ns = None if resource == api_mod.NODES else namespace or self.options.namespace
        return bool(self.call(lambda: self.api.delete(resource, ns, name)))

    def events(self, namespace: str | None = None) -> builtins.list[dict[str, Any]]:
        return sorted(self.list(api_mod.EVENTS, namespace), key=lambda e: e.get("eventTime") or "")

    def wait_for(self, check: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> Any:
        """Re-evaluate `check` after every API write (and at least every second) until truthy."""
        return wait_on_writes(
            self.changed,
            lambda: self.version,
            check,
            timeout=timeout,
            failure=lambda: TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"),
        )

    # ---- faults -------------------------------------------------------------------------------
    def sidecar_client(self, node: str) -> client_mod.SidecarClient:
        return client_mod.SidecarClient(self.nodes[node].spec.sidecar_address, timeout=10.0)

    def inject_gpu_fault(
        self, node: str, gpu_index: int, *, kind: str = "XID", xid: int = 79, message: str = ""
    ) -> None:
        """A GPU fault through the node sidecar's InjectFault RPC (the fake NVML records it)."""
        from ghostserve.v1 import sidecar_pb2 as pb

        with self.sidecar_client(node) as side:
            side.inject_fault(
                gpu_index=gpu_index, kind=pb.HealthKind.Value(kind), xid=xid if kind == "XID" else 0,
                message=message or (f"injected Xid {xid}" if kind == "XID" else f"injected {kind}"),
            )  # fmt: skip

    def repair_gpu(self, node: str, gpu_index: int) -> None:
        """The broken GPU was replaced: HEALTHY through InjectFault; the device plugin offers it again."""
        self.inject_gpu_fault(node, gpu_index, kind="HEALTHY", message="GPU replaced")

    def gpu_uuids(self, node: str) -> builtins.list[str]:
        return [g.uuid for g in self.nodes[node].plugin.gpus]

    def kill_pod(self, pod_name: str) -> None:
        """SIGKILL a running pod's whole process tree (a crash: the node agent reports the exit)."""

        async def kill() -> None:
            for n in self.nodes.values():
                for run in n.kubelet.runs.values():
                    if run.pod["metadata"]["name"] == pod_name and run.process and run.process.running:
                        run.process.signal_tree(signal.SIGKILL)
                        return
            raise LookupError(f"no running pod {pod_name}")

        self.call(kill)

    def kill_sidecar(self, node: str) -> int:
        """SIGKILL the node's sidecar; returns how many times it had been started."""
        before = self.nodes[node].sidecar_starts
        self.call(self.nodes[node].kill_sidecar)
        return before

    def power_off(self, node: str) -> None:
        """The node dies; the node lifecycle controller marks it NotReady and taints it unreachable."""
        self.call(self.nodes[node].power_off)
        taints = [
            {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule", "timeAdded": api_mod.now()},
            {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": api_mod.now()},
        ]
        ready = {
            "type": "Ready",
            "status": "Unknown",
            "reason": "NodeStatusUnknown",
            "message": "Kubelet stopped posting node status.",
        }
        self.patch(api_mod.NODES, node, {"spec": {"taints": taints}, "status": {"conditions": [ready]}})

    def remove_node(self, node: str) -> None:
        """Delete a dead node's object; the pod garbage collector force-deletes the pods bound to it."""
        self.delete(api_mod.NODES, node)
        for pod in self.list(api_mod.PODS):
            if pod["spec"].get("nodeName") == node:
                meta = pod["metadata"]
                self.call(
                    functools.partial(
                        self.api.delete,
                        api_mod.PODS,
                        meta["namespace"],
                        meta["name"],
                        uid=meta["uid"],
                        grace=0,
                    )
                )

    def pod_processes(self) -> Iterator[int]:
        for n in self.nodes.values():
            for run in n.kubelet.runs.values():
                if run.process is not None and run.process.running and run.process.pid:
                    yield run.process.pid


def chart_crds() -> Any:
    return apiserver.resource(chart.CRDS)


def resource_of(obj: dict[str, Any]) -> Any:
    """The emulator's resource of a manifest (apiVersion + kind, the resources this cluster serves)."""
    kinds = {
        ("v1", "Pod"): "v1/pods",
        ("v1", "Node"): "v1/nodes",
        ("v1", "Service"): "v1/services",
        ("v1", "Event"): "v1/events",
        ("ghostserve.io/v1alpha1", "GhostServeDeployment"): "ghostserve.io/v1alpha1/ghostservedeployments",
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): chart.CRDS,
    }
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in kinds:
        raise ValueError(f"the embedded cluster does not serve {key[1]} ({key[0]})")
    return apiserver.resource(kinds[key])


async def _async(value: Any) -> Any:
    return value


def manifests(paths: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
    import yaml

    return [doc for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]
