"""One simulated GPU node: its sidecar process (the DaemonSet pod), device plugin and node agent.

The node has a root directory (hostPath volumes resolve under it), a loopback IP (InternalIP; its
sidecar listens there on the chart's port), a shared-memory prefix for its KV pools and a fake GPU
directory with its own GPU UUIDs. The sidecar is restarted when it dies, as a DaemonSet pod would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import platform
import signal
import sys
import time
from typing import Any

import grpc
from ghostserve.cluster import api as api_mod
from ghostserve.cluster import containers, deviceplugin, kubelet, processes
from ghostserve.sidecar import client as client_mod
from ghostserve.sidecar import fakegpu

log = logging.getLogger("ghostserve.cluster")
SOCKET_DIR = "run/ghostserve"  # the chart's sidecar.socketDir, under the node root
SHM_DIR = "dev/shm/ghostserve"  # the chart's sidecar.shmDir, under the node root


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    name: str
    ip: str
    gpus: int
    root: pathlib.Path
    shm_prefix: str
    sidecar_port: int
    control_plane: bool = False  # no GPUs, no sidecar, tainted like kubeadm's control-plane node

    @property
    def gpu_node(self) -> bool:
        return self.gpus > 0

    @property
    def sidecar_address(self) -> str:
        return f"{self.ip}:{self.sidecar_port}"

    @property
    def socket(self) -> pathlib.Path:
        return self.root / SOCKET_DIR / "sidecar.sock"

    @property
    def fake_gpu_dir(self) -> pathlib.Path:
        return self.root / "var" / "lib" / "fake-nvml"


class Node:
    def __init__(
        self,
        spec: NodeSpec,
        *,
        api: api_mod.Api,
        take_ip: Any,
        images: containers.ImageTable,
        kubeconfig: pathlib.Path,
        uuid_namespace: str,
    ) -> None:
        self.spec, self.api = spec, api
        uuids = fakegpu.make_uuids(spec.name, spec.gpus, namespace=uuid_namespace)
        self.plugin = deviceplugin.DevicePlugin(
            [deviceplugin.Gpu(i, u) for i, u in enumerate(uuids)], spec.fake_gpu_dir
        )
        self.plugin.on_change = self._on_plugin_change
        self.kubelet = kubelet.Kubelet(
            node=spec.name,
            api=api,
            plugin=self.plugin,
            root=spec.root,
            take_ip=take_ip,
            images=images,
            kubeconfig=kubeconfig,
        )
        self.sidecar: processes.Process | None = None
        self.sidecar_starts = 0
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.spec
        for d in (SOCKET_DIR, SHM_DIR):
            (s.root / d).mkdir(parents=True, exist_ok=True)
        if s.gpu_node:  # the sidecar DaemonSet runs on GPU nodes only
            fakegpu.write_inventory(s.fake_gpu_dir, [g.uuid for g in self.plugin.gpus])
            await self.start_sidecar()
        await self.api.create(api_mod.NODES, self.node_object())
        self.tasks = [asyncio.create_task(self.kubelet.run())]
        if s.gpu_node:
            self.tasks.append(
                asyncio.create_task(self.plugin.watch(s.sidecar_address, stopping=self.stopping))
            )
            self.tasks.append(asyncio.create_task(self._supervise()))

    def _sidecar_argv(self) -> list[str]:
        s = self.spec
        return [
            sys.executable, "-m", "ghostserve.cli.main", "sidecar",
            "--socket", str(s.socket),
            "--listen", s.sidecar_address,
            "--insecure",  # loopback only (CONTRACTS: SIDECAR amendment 02:00)
            "--fake-gpu-dir", str(s.fake_gpu_dir),
            "--node", s.name,
            "--shm-prefix", s.shm_prefix,
            "--state-dir", str(s.root / "var" / "lib" / "ghostserve"),
            "--budget", "1GiB",
            "--grace", "1",
        ]  # fmt: skip

    async def start_sidecar(self, *, timeout_s: float = 60.0) -> None:
        """Start the node's sidecar and wait until it serves. Raises RuntimeError when it does not."""
        s = self.spec
        proc = processes.Process(
            self._sidecar_argv(), env=_env(), cwd=s.root, log=s.root / "var" / "log" / "sidecar.log"
        )
        proc.start()
        self.sidecar = proc
        self.sidecar_starts += 1
        deadline = time.monotonic() + timeout_s
        async with client_mod.AsyncSidecarClient(s.sidecar_address, timeout=1.0) as side:
            while True:
                if not proc.running:
                    raise RuntimeError(f"sidecar of {s.name} exited; see {proc.log}")
                try:
                    await side.health()
                    return
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"sidecar of {s.name} did not serve in {timeout_s}s") from None
                    await asyncio.sleep(0.1)

    async def _supervise(self) -> None:
        """The DaemonSet: a sidecar that exits is started again while the node is up."""
        while not self.stopping.is_set():
            proc = self.sidecar
            if proc is None:
                await asyncio.sleep(0.2)
                continue
            await proc.wait()
            if self.stopping.is_set() or not self.kubelet.powered:
                return
            log.warning("sidecar-exited", extra={"node": self.spec.name, "action": "restarting"})
            await asyncio.sleep(0.5)
            with contextlib.suppress(RuntimeError):
                await self.start_sidecar()

    def node_object(self) -> dict[str, Any]:
        s = self.spec
        gpus = str(s.gpus)
        labels = {"kubernetes.io/hostname": s.name, "kubernetes.io/os": "linux"}
        spec: dict[str, Any] = {}
        if s.control_plane:
            labels["node-role.kubernetes.io/control-plane"] = ""
            spec["taints"] = [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
        if s.gpu_node:
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": gpus,
                "nvidia.com/gpu.product": "GhostServe-Fake-GPU",
            }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": s.name, "labels": labels},
            "spec": spec,
            "status": {
                "capacity": {"nvidia.com/gpu": gpus, "pods": "110"},
                "allocatable": {"nvidia.com/gpu": str(self.plugin.healthy), "pods": "110"},
                "addresses": [
                    {"type": "InternalIP", "address": s.ip},
                    {"type": "Hostname", "address": s.name},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "lastHeartbeatTime": api_mod.now(),
                    }
                ],
                "nodeInfo": {
                    "architecture": platform.machine(),
                    "bootID": s.name,
                    "containerRuntimeVersion": "local://ghostserve-embedded",
                    "kernelVersion": platform.release(),
                    "kubeProxyVersion": "",
                    "kubeletVersion": "ghostserve-embedded",
                    "machineID": s.name,
                    "operatingSystem": "linux",
                    "osImage": "ghostserve embedded node",
                    "systemUUID": s.name,
                },
            },
        }

    def _on_plugin_change(self) -> None:
        task = asyncio.ensure_future(self.report_allocatable())
        self.tasks.append(task)

    async def report_allocatable(self) -> None:
        """What the kubelet does when the device plugin's healthy list changes."""
        if self.kubelet.powered:
            healthy = str(self.plugin.healthy)
            await self.api.patch(
                api_mod.NODES, None, self.spec.name, {"status": {"allocatable": {"nvidia.com/gpu": healthy}}}
            )
            self.kubelet.kick.set()

    # ---- faults -------------------------------------------------------------------------------
    async def kill_sidecar(self) -> None:
        """SIGKILL the sidecar (it is started again by the DaemonSet stand-in)."""
        if self.sidecar is not None and self.sidecar.running:
            self.sidecar.signal_tree(signal.SIGKILL)

    async def power_off(self) -> None:
        """The machine dies: pods and sidecar are SIGKILLed, its memory (the pools in /dev/shm) is gone,
        and the node stops reporting."""
        await self.kubelet.power_off()
        if self.sidecar is not None:
            await self.sidecar.stop(0)
        for segment in pathlib.Path("/dev/shm").glob(self.spec.shm_prefix + "*"):
            segment.unlink(missing_ok=True)

    async def stop(self) -> None:
        """Tear down: pods (SIGKILL), then the sidecar (SIGTERM: it frees its pools)."""
        self.stopping.set()
        await self.kubelet.shutdown()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.sidecar is not None:
            await self.sidecar.stop(10.0)


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env
