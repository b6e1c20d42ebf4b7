"""In-process access to the API emulator for the control-plane stand-ins (scheduler, node agents).

They live in the emulator's event loop and read and write its objects directly (a real kubelet and
scheduler go through the API server; the writes here take the same path as HTTP requests, so every
watcher sees them). Also the Events they post, with microsecond times for the demo's report.
"""

from __future__ import annotations

import copy
import datetime
import uuid
from collections.abc import Mapping
from typing import Any

import kmock
from ghostserve.cluster import apiserver

PODS, NODES, EVENTS = apiserver.PODS, apiserver.NODES, apiserver.EVENTS


def now(*, micro: bool = False) -> str:
    stamp = datetime.datetime.now(datetime.UTC)
    if micro:
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    def __init__(self, emulator: apiserver.Emulator) -> None:
        self.emulator = emulator

    def list(self, resource: Any, namespace: str | None = None) -> list[dict[str, Any]]:
        """Deep copies of the live objects of a resource."""
        return [
            copy.deepcopy(o.raw)
            for (res, ns, _), o in list(self.emulator.objects.items())
            if res == resource and not o.deleted and (namespace is None or ns == namespace)
        ]

    def get(self, resource: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        objects: Any = self.emulator.objects
        if key not in objects or objects[key].deleted:
            return None
        return copy.deepcopy(objects[key].raw)

    async def create(self, resource: Any, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        await self.emulator.write("create", resource, meta.get("namespace"), meta.get("name"), dict(obj))

    async def patch(self, resource: Any, namespace: str | None, name: str, patch: Any) -> bool:
        """Merge (dict) or JSON (list) patch; False when the object is gone."""
        try:
            await self.emulator.write("update", resource, namespace, name, patch)
        except kmock.KubernetesError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_pod(self, pod: Mapping[str, Any], patch: Any) -> bool:
        """Patch a pod only while it is the same object (a replacement of the same name is left alone)."""
        meta = pod["metadata"]
        current = self.get(PODS, meta["namespace"], meta["name"])
        if current is None or current["metadata"]["uid"] != meta["uid"]:
            return False
        return await self.patch(PODS, meta["namespace"], meta["name"], patch)

    async def delete(
        self,
        resource: Any,
        namespace: str | None,
        name: str,
        *,
        uid: str | None = None,
        grace: int | None = None,
    ) -> bool:
        options: dict[str, Any] = {}
        if uid:
            options["preconditions"] = {"uid": uid}
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        try:
            await self.emulator.write("delete", resource, namespace, name, options)
        except kmock.KubernetesError as exc:
            if exc.status in {404, 409}:
                return False
            raise
        return True

    async def event(
        self, obj: Mapping[str, Any], reason: str, message: str, *, component: str, type_: str = "Normal"
    ) -> None:
        """Post a core/v1 Event about `obj` (as kube-scheduler and the kubelet do)."""
        meta = obj["metadata"]
        stamp = now()
        await self.create(
            EVENTS,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{uuid.uuid4().hex[:12]}",
                    "namespace": meta.get("namespace") or "default",
                },
                "involvedObject": {
                    "apiVersion": obj.get("apiVersion", "v1"),
                    "kind": obj.get("kind", "Pod"),
                    "name": meta["name"],
                    "namespace": meta.get("namespace"),
                    "uid": meta.get("uid"),
                },
                "reason": reason,
                "message": message,
                "type": type_,
                "source": {"component": component},
                "reportingComponent": component,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "eventTime": now(micro=True),
                "count": 1,
            },
        )
