"""The kube-scheduler stand-in: binds each pending pod to a node chosen by scheduling.place."""

from __future__ import annotations

import asyncio
from typing import Any

from ghostserve.cluster import api as api_mod
from ghostserve.cluster import scheduling


class Scheduler:
    def __init__(self, api: api_mod.Api) -> None:
        self.api = api
        self.kick = asyncio.Event()
        self._told: dict[str, str] = {}  # pod uid -> last FailedScheduling message posted

    async def run(self) -> None:
        while True:
            await self.kick.wait()
            self.kick.clear()
            await self.step()

    async def step(self) -> None:
        pods = self.api.list(api_mod.PODS)
        nodes = sorted(self.api.list(api_mod.NODES), key=lambda n: n["metadata"]["name"])
        pending = sorted(
            (p for p in pods if not p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")),
            key=lambda p: p["metadata"].get("creationTimestamp", ""),
        )
        for pod in pending:
            placed = scheduling.place(pod, nodes, pods)
            if placed.node is None:
                await self._unschedulable(pod, placed.message)
                continue
            pod["spec"]["nodeName"] = placed.node
            if await self.api.patch_pod(pod, {"spec": {"nodeName": placed.node}}):
                pods = [p for p in pods if p["metadata"]["uid"] != pod["metadata"]["uid"]] + [pod]
                self._told.pop(pod["metadata"]["uid"], None)
                meta = pod["metadata"]
                await self.api.event(
                    pod,
                    "Scheduled",
                    f"Successfully assigned {meta['namespace']}/{meta['name']} to {placed.node}",
                    component="default-scheduler",
                )

    async def _unschedulable(self, pod: dict[str, Any], message: str) -> None:
        uid = pod["metadata"]["uid"]
        if self._told.get(uid) == message:
            return
        self._told[uid] = message
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        await self.api.patch_pod(pod, {"status": {"phase": "Pending", "conditions": [condition]}})
        await self.api.event(pod, "FailedScheduling", message, component="default-scheduler", type_="Warning")
