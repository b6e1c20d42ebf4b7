"""The node agent of one simulated node (the kubelet stand-in): runs the pods bound to its node.

For every pod bound here it admits the container (GPUs from the device plugin, a loopback pod IP),
starts it as a local process tree (containers.launch), reports status as a kubelet does (phase,
podIP, containerStatuses with running/terminated state, exit code and restarts, Ready from the
readiness probe), restarts it per restartPolicy, and on deletion stops the tree (SIGTERM, SIGKILL
after the grace period) before removing the object. A powered-off node does none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
from ghostserve.cluster import api as api_mod
from ghostserve.cluster import containers, deviceplugin, processes, scheduling

log = logging.getLogger("ghostserve.cluster")
PROBE_PERIOD_CAP_S = 0.5  # probes run at most this far apart (the stand-in favours quick tests)
RESTART_BACKOFF_S = 1.0


@dataclasses.dataclass
class PodRun:
    """What the node agent holds for one admitted pod."""

    pod: dict[str, Any]
    ip: str
    gpus: list[deviceplugin.Gpu]
    task: asyncio.Task[None] | None = None
    process: processes.Process | None = None
    stopping: bool = False
    ready: bool = False


class Kubelet:
    def __init__(
        self,
        *,
        node: str,
        api: api_mod.Api,
        plugin: deviceplugin.DevicePlugin,
        root: pathlib.Path,
        take_ip: Callable[[], str],
        images: containers.ImageTable,
        kubeconfig: pathlib.Path,
    ) -> None:
        self.node, self.api, self.plugin, self.root = node, api, plugin, root
        self.take_ip, self.images, self.kubeconfig = take_ip, images, kubeconfig
        self.runs: dict[str, PodRun] = {}  # pod uid -> run
        self.powered = True
        self.kick = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self.kick.wait()
            self.kick.clear()
            if self.powered:
                await self.sync()

    async def sync(self) -> None:
        """Start pods newly bound here; stop pods deleted or being deleted."""
        mine = {
            p["metadata"]["uid"]: p
            for p in self.api.list(api_mod.PODS)
            if (p.get("spec") or {}).get("nodeName") == self.node
        }
        for uid, run in list(self.runs.items()):
            pod = mine.get(uid)
            if (pod is None or pod["metadata"].get("deletionTimestamp")) and not run.stopping:
                run.stopping = True
                self._spawn(self._terminate(run, pod))
        for uid, pod in mine.items():
            if uid in self.runs or pod["metadata"].get("deletionTimestamp"):
                if uid not in self.runs and pod["metadata"].get("deletionTimestamp"):
                    await self.api.delete(
                        api_mod.PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], uid=uid, grace=0
                    )
                continue
            if (pod.get("status") or {}).get("phase") in {"Failed", "Succeeded"}:
                continue
            admitted = self._admit(pod)
            if admitted is not None:
                admitted.task = asyncio.create_task(self._run_pod(admitted))

    def _admit(self, pod: dict[str, Any]) -> PodRun | None:
        uid = pod["metadata"]["uid"]
        try:
            gpus = self.plugin.allocate(uid, scheduling.gpu_request(pod))
        except deviceplugin.AdmissionError as exc:
            self._spawn(self._fail(pod, "UnexpectedAdmissionError", str(exc)))
            return None
        run = PodRun(pod, self.take_ip(), gpus)
        self.runs[uid] = run
        return run

    async def _fail(self, pod: dict[str, Any], reason: str, message: str) -> None:
        await self.api.patch_pod(pod, {"status": {"phase": "Failed", "reason": reason, "message": message}})
        await self.api.event(pod, reason, message, component="kubelet", type_="Warning")

    # ---- one pod ----------------------------------------------------------------------------
    def _pod_dir(self, run: PodRun) -> pathlib.Path:
        meta = run.pod["metadata"]
        return (
            self.root
            / "var"
            / "lib"
            / "kubelet"
            / "pods"
            / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        )

    async def _status(self, run: PodRun, phase: str, container: dict[str, Any], **extra: Any) -> None:
        ready = "True" if run.ready else "False"
        conditions = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready, "lastTransitionTime": api_mod.now(micro=True)},
        ]
        status = {
            "phase": phase,
            "hostIP": self._host_ip(),
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "conditions": conditions,
            "containerStatuses": [container],
            **extra,
        }
        await self.api.patch_pod(run.pod, {"status": status})

    def _host_ip(self) -> str:
        node = self.api.get(api_mod.NODES, None, self.node) or {}
        for a in (node.get("status") or {}).get("addresses") or []:
            if a.get("type") == "InternalIP":
                return str(a["address"])
        return ""

    async def _run_pod(self, run: PodRun) -> None:
        pod = run.pod
        spec = pod["spec"]
        container = spec["containers"][0]
        base = {"name": container.get("name", "main"), "image": container.get("image", ""), "imageID": ""}
        restarts = 0
        last_state: dict[str, Any] = {}
        policy = spec.get("restartPolicy", "Always")
        start_time = api_mod.now()
        pod.setdefault("status", {})["podIP"] = run.ip
        while not run.stopping:
            try:
                launch = containers.launch(
                    pod,
                    images=self.images,
                    node_root=self.root,
                    device_env=self.plugin.env(run.gpus),
                    kubeconfig=self.kubeconfig,
                )
            except containers.ContainerError as exc:
                waiting = {"waiting": {"reason": exc.reason, "message": str(exc)}}
                await self._status(
                    run, "Pending", {**base, "ready": False, "restartCount": 0, "state": waiting}
                )
                await self.api.event(pod, "Failed", str(exc), component="kubelet", type_="Warning")
                return
            for host in containers.host_paths(pod, container, self.root).values():
                host.mkdir(parents=True, exist_ok=True)
            proc = processes.Process(
                launch.argv, env=launch.env, cwd=self._pod_dir(run), log=self._pod_dir(run) / "container.log"
            )
            self._pod_dir(run).mkdir(parents=True, exist_ok=True)
            started = api_mod.now()
            run.process = proc
            try:
                proc.start()
            except OSError as exc:
                code, reason = 128, "StartError"
                log.warning(
                    "container-start-failed",
                    extra={"node": self.node, "pod": pod["metadata"]["name"], "error": str(exc)},
                )
            else:
                running = {"running": {"startedAt": started}}
                await self._status(
                    run,
                    "Running",
                    {
                        **base,
                        "ready": False,
                        "started": True,
                        "restartCount": restarts,
                        "state": running,
                        "lastState": last_state,
                        "containerID": f"local://{proc.pid}",
                    },
                    startTime=start_time,
                )
                await self.api.event(
                    pod, "Started", f"Started container {base['name']} (pid {proc.pid})", component="kubelet"
                )
                probe = asyncio.create_task(self._probe(run, container, base, restarts, running, last_state))
                try:
                    code = await proc.wait()
                finally:
                    probe.cancel()
                proc.signal_tree(signal.SIGKILL)  # the container's PID namespace dies with its first process
                reason = "Completed" if code == 0 else "Error"
            if run.stopping:
                return
            run.ready = False
            exit_code = 128 - code if code < 0 else code
            terminated = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason,
                    "startedAt": started,
                    "finishedAt": api_mod.now(),
                }
            }
            if policy == "Always" or (policy == "OnFailure" and exit_code != 0):
                restarts += 1
                last_state = terminated
                waiting = {"waiting": {"reason": "CrashLoopBackOff", "message": f"exit code {exit_code}"}}
                await self._status(
                    run,
                    "Running",
                    {
                        **base,
                        "ready": False,
                        "restartCount": restarts,
                        "state": waiting,
                        "lastState": last_state,
                    },
                )
                await asyncio.sleep(RESTART_BACKOFF_S)
                continue
            phase = "Succeeded" if exit_code == 0 else "Failed"
            await self._status(
                run,
                phase,
                {
                    **base,
                    "ready": False,
                    "restartCount": restarts,
                    "state": terminated,
                    "lastState": last_state,
                },
            )
            self.plugin.release(pod["metadata"]["uid"])
            return

    async def _probe(
        self,
        run: PodRun,
        container: dict[str, Any],
        base: dict[str, Any],
        restarts: int,
        running: dict[str, Any],
        last_state: dict[str, Any],
    ) -> None:
        """Readiness (after the startup probe, if any, first passed); no probe = ready once started."""
        readiness, startup = container.get("readinessProbe"), container.get("startupProbe")
        failures = 0
        started = startup is None
        async with aiohttp.ClientSession() as http:
            while True:
                probe = readiness if started else startup
                ok = True if probe is None else await self._check(http, run, container, probe)
                if not started:
                    started = ok
                    ok = ok and (readiness is None or await self._check(http, run, container, readiness))
                failures = 0 if ok else failures + 1
                threshold = int((readiness or {}).get("failureThreshold", 3))
                new = True if ok else (run.ready and failures < threshold)
                if new != run.ready:
                    run.ready = new
                    await self._status(
                        run,
                        "Running",
                        {
                            **base,
                            "ready": new,
                            "started": True,
                            "restartCount": restarts,
                            "state": running,
                            "lastState": last_state,
                        },
                    )
                period = float((probe or {}).get("periodSeconds", 10))
                await asyncio.sleep(min(period, PROBE_PERIOD_CAP_S))

    async def _check(
        self, http: aiohttp.ClientSession, run: PodRun, container: dict[str, Any], probe: dict[str, Any]
    ) -> bool:
        def port_of(value: Any) -> int:
            for p in container.get("ports") or []:
                if p.get("name") == value:
                    return int(p["containerPort"])
            return int(value)

        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                url = f"{scheme}://{run.ip}:{port_of(get['port'])}{get.get('path', '/')}"
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
                    return 200 <= reply.status < 400
            if "tcpSocket" in probe:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(run.ip, port_of(probe["tcpSocket"]["port"])), timeout
                )
                writer.close()
                return True
        except (OSError, aiohttp.ClientError, TimeoutError):
            return False
        return True  # exec probes are not run by the stand-in (docs/cluster.md)

    async def _terminate(self, run: PodRun, pod: dict[str, Any] | None) -> None:
        """Stop the pod's tree (grace from the deletion), free its GPUs, then remove the object."""
        meta = run.pod["metadata"]
        grace = float((pod or {}).get("metadata", {}).get("deletionGracePeriodSeconds") or 0)
        if run.task is not None:
            run.task.cancel()
        if run.process is not None:
            await self.api.event(
                run.pod, "Killing", f"Stopping container (grace {grace:g}s)", component="kubelet"
            )
            await run.process.stop(grace)
        if run.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await run.task
        self.plugin.release(meta["uid"])
        self.runs.pop(meta["uid"], None)
        if pod is not None:
            await self.api.delete(api_mod.PODS, meta["namespace"], meta["name"], uid=meta["uid"], grace=0)
        self.kick.set()

    # ---- the node dies / ends -----------------------------------------------------------------
    async def power_off(self) -> None:
        """The node dies: every process tree is SIGKILLed and nothing is reported any more."""
        self.powered = False
        for run in list(self.runs.values()):
            run.stopping = True
            if run.task is not None:
                run.task.cancel()
            if run.process is not None:
                await run.process.stop(0)
        self.runs.clear()

    async def shutdown(self) -> None:
        """Stop every pod (SIGKILL) without touching the API: the cluster is going away."""
        await self.power_off()
