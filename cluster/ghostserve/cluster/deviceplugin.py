"""The device-plugin stand-in of one node: which GPUs are healthy, which pod holds which GPU.

Like the NVIDIA device plugin it learns health from the node (here: the node sidecar's WatchHealth
stream, never from whoever injected the fault), advertises the healthy count (the node agent writes
it to `allocatable nvidia.com/gpu`), never gives an unhealthy GPU to a new container, and tells the
container which GPUs it got through NVIDIA_VISIBLE_DEVICES (UUIDs) and CUDA_VISIBLE_DEVICES (indexes).
Rank i of a pod runs on the i-th GPU listed (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from ghostserve.sidecar import client as client_mod
from ghostserve.sidecar import fakegpu
from ghostserve.v1 import sidecar_pb2 as pb

log = logging.getLogger("ghostserve.cluster")


class AdmissionError(RuntimeError):
    """Fewer healthy free GPUs than the container asks for (the kubelet's UnexpectedAdmissionError)."""


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str


class DevicePlugin:
    """GPU bookkeeping of one node (pure state; `watch` feeds it from the sidecar)."""

    def __init__(self, gpus: Sequence[Gpu], fake_dir: pathlib.Path) -> None:
        self.gpus = list(gpus)
        self.fake_dir = fake_dir
        self.unhealthy: dict[str, str] = {}  # uuid -> why
        self.holder: dict[str, str] = {}  # uuid -> pod uid
        self.on_change: Callable[[], None] = lambda: None

    @property
    def healthy(self) -> int:
        return sum(1 for g in self.gpus if g.uuid not in self.unhealthy)

    def allocate(self, pod_uid: str, count: int) -> list[Gpu]:
        """`count` healthy GPUs nobody holds, lowest index first. Raises AdmissionError."""
        mine = [g for g in self.gpus if self.holder.get(g.uuid) == pod_uid]
        if mine:
            return mine  # the same pod admitted again (container restart): same devices
        free = [g for g in self.gpus if g.uuid not in self.unhealthy and g.uuid not in self.holder]
        if len(free) < count:
            raise AdmissionError(
                f"Allocate failed: requested {count} nvidia.com/gpu, {len(free)} healthy and unallocated"
            )
        for g in free[:count]:
            self.holder[g.uuid] = pod_uid
        return free[:count]

    def release(self, pod_uid: str) -> None:
        for uuid in [u for u, holder in self.holder.items() if holder == pod_uid]:
            del self.holder[uuid]

    def env(self, gpus: Sequence[Gpu]) -> dict[str, str]:
        return {
            "NVIDIA_VISIBLE_DEVICES": ",".join(g.uuid for g in gpus),
            "CUDA_VISIBLE_DEVICES": ",".join(str(g.index) for g in gpus),
            fakegpu.ENV: str(self.fake_dir),
        }

    def note(self, uuid: str, *, fatal: bool, healthy: bool, message: str) -> bool:
        """Apply one health event; True when the healthy set changed. Unknown UUIDs are ignored.
        A GPU turns healthy again only on a HEALTHY event (replaced or reset), not on a warning."""
        if uuid not in {g.uuid for g in self.gpus}:
            log.warning("device-plugin-unknown-gpu", extra={"gpu": uuid, "action": "ignored"})
            return False
        if fatal and uuid not in self.unhealthy:
            self.unhealthy[uuid] = message
            return True
        if healthy and uuid in self.unhealthy:
            del self.unhealthy[uuid]
            return True
        return False

    async def watch(self, address: str, *, stopping: asyncio.Event) -> None:
        """Follow the sidecar's health stream until `stopping`; re-subscribes after the sidecar restarts."""
        while not stopping.is_set():
            async with client_mod.AsyncSidecarClient(address, timeout=5.0) as side:
                call: Any = side.watch_health(initial_state=True)
                try:
                    async for event in call:
                        healthy = event.kind == pb.HealthKind.HEALTHY
                        if self.note(
                            event.gpu_uuid, fatal=event.fatal, healthy=healthy, message=event.message
                        ):
                            self.on_change()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}:
                        log.warning(
                            "device-plugin-health-stream-failed",
                            extra={"address": address, "error": exc.details()},
                        )
                finally:
                    call.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.2)
