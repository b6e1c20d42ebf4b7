"""Operator configuration and the per-run state shared by handlers (kept in kopf's memo)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable

from ghostserve.operator import cache, faults, firstpass, kube, sidecars, specs

log = logging.getLogger("ghostserve.operator")
VIEW_SETTLE_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class Config:
    sidecar_address_template: str = "{node_ip}:{port}"  # also {node}; or unix:///run/ghostserve/sidecar.sock
    tls: sidecars.TLSFiles | None = None
    gpu_conditions: frozenset[str] = faults.DEFAULT_GPU_CONDITIONS
    resync_seconds: float = 30.0  # level-based re-check of every deployment without any signal
    recovery_timeout_seconds: float = 900.0  # replacements not running by then: the recovery failed
    sidecar_timeout_seconds: float = 10.0
    watch_health: bool = True
    # Routine first passes (healthy deployments) running at once after a start; urgent ones never wait.
    first_pass_limit: int = firstpass.DEFAULT_LIMIT
    node_access: specs.NodeAccess = dataclasses.field(default_factory=specs.NodeAccess)
    # Image of each deployment's resume gateway (the operator's own; the chart sets the variable).
    # Empty: no gateway is deployed and status.gatewayURL stays unset.
    gateway_image: str = dataclasses.field(
        default_factory=lambda: os.environ.get("GHOSTSERVE_GATEWAY_IMAGE", "")
    )
    # ClusterRole the chart ships for the gateways (pods list); each deployment's gateway ServiceAccount
    # is bound to it in the deployment's namespace (ghostserve.operator.gatewayaccess).
    gateway_role: str = dataclasses.field(
        default_factory=lambda: os.environ.get("GHOSTSERVE_GATEWAY_ROLE", "ghostserve-gateway")
    )


class Runtime:
    """Everything one operator run shares: config, API clients, the cluster view, wake-ups."""

    def __init__(self, config: Config, kube_api: kube.Kube, sidecar_port: sidecars.SidecarPort) -> None:
        self.config = config
        self.kube = kube_api
        self.sidecars = sidecar_port
        self.view = cache.ClusterView()
        self._wakers: dict[cache.Key, asyncio.Event] = {}
        self._health_tasks: dict[str, asyncio.Task[None]] = {}
        self._started = time.monotonic()
        self.first_passes = firstpass.Gate(config.first_pass_limit)

    def settled(self) -> bool:
        """The watches had time to list what exists. Until then a pod missing from the view may simply
        not be listed yet, so nothing is destroyed on the strength of its absence."""
        return time.monotonic() - self._started > VIEW_SETTLE_SECONDS

    def waker(self, key: cache.Key) -> asyncio.Event:
        return self._wakers.setdefault(key, asyncio.Event())

    def wake(self, key: cache.Key | None) -> None:
        if key is not None and key in self._wakers:
            self._wakers[key].set()

    def forget(self, key: cache.Key) -> None:
        self._wakers.pop(key, None)
        self.view.forget(key)

    def sidecar_address(self, node: str, port: int) -> str:
        return self.config.sidecar_address_template.format(
            node=node, node_ip=self.view.node_ip(node), port=port
        )

    def ensure_health_watch(self, node: str, port: int, on_fault: Callable[[faults.Fault], None]) -> None:
        """Keep one health stream per sidecar address (several nodes may share one in tests)."""
        address = self.sidecar_address(node, port)
        task = self._health_tasks.get(address)
        if self.config.watch_health and (task is None or task.done()):
            self._health_tasks[address] = asyncio.create_task(self._watch(address, node, on_fault))

    async def _watch(self, address: str, node: str, on_fault: Callable[[faults.Fault], None]) -> None:
        delay = 0.5
        while True:
            try:
                async for event in self.sidecars.watch_health(address):
                    delay = 0.5
                    fault = faults.classify_health(event, fallback_node=node)
                    if fault is not None and fault.group is None:
                        # Kept: DescribeGroup's device UUIDs may still attribute it; never a guess.
                        log.warning("gpu-fault-unattributed", extra={"fault": fault.message})
                    if fault is not None:
                        on_fault(fault)
                    elif event.get("kind") == "HEALTHY":
                        self.view.gpu_healthy(event.get("node") or node, event.get("gpu_uuid") or None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the sidecar restarts or is not up yet: reconnect with backoff
                log.debug("health-stream-failed", extra={"address": address, "error": str(exc)})
            await asyncio.sleep(delay)  # reconnect backoff (nothing to wait on: the sidecar is away)
            delay = min(delay * 2, 30.0)

    async def close(self) -> None:
        for task in self._health_tasks.values():
            task.cancel()
        await asyncio.gather(*self._health_tasks.values(), return_exceptions=True)
        await self.sidecars.close()
        await self.kube.close()
