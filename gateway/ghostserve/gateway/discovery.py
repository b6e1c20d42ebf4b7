"""Backends from Kubernetes: the ready pods matching a label selector, like sglang-router's service
discovery. `backends_from_pods` is pure; `KubeLister` is the one place that talks to the API server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ghostserve.gateway import backends as backends_mod

log = logging.getLogger(__name__)


def backends_from_pods(pods: Sequence[Mapping[str, Any]], *, port: int) -> list[backends_mod.Backend]:
    """Backends for the pods that are Ready and have an IP, named by pod name, sorted by name. Pure."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        ip = status.get("podIP")
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        if ip and ready and not meta.get("deletionTimestamp"):
            host = f"[{ip}]" if ":" in ip else ip
            out.append(backends_mod.Backend(str(meta.get("name", ip)), f"http://{host}:{port}"))
    return sorted(out, key=lambda b: b.name)


class KubeLister:
    """Lists the selector's pods through the Kubernetes API, at most every `refresh` seconds.

    A failed list keeps the last known backends (and logs): a short API outage must not make every
    in-flight request think its backend is gone.
    """

    def __init__(self, *, namespace: str, selector: str, port: int, refresh: float = 1.0) -> None:
        self.namespace = namespace
        self.selector = selector
        self.port = port
        self.refresh = refresh
        self._api: Any = None
        self._cached: list[backends_mod.Backend] = []
        self._at = float("-inf")

    async def __call__(self) -> list[backends_mod.Backend]:
        if time.monotonic() - self._at < self.refresh:
            return self._cached
        try:
            pods = await self._list_pods()
        except Exception as exc:  # the API client raises many types; any of them means "not now"
            log.warning("listing pods %r in %s failed: %s", self.selector, self.namespace, exc)
            return self._cached
        self._cached = backends_from_pods(pods, port=self.port)
        self._at = time.monotonic()
        return self._cached

    async def _list_pods(self) -> list[dict[str, Any]]:
        import kubernetes_asyncio.client as k8s_client
        import kubernetes_asyncio.config as k8s_config

        if self._api is None:
            try:
                k8s_config.load_incluster_config()
            except k8s_config.ConfigException:
                await k8s_config.load_kube_config()
            self._api = k8s_client.ApiClient()
        core = k8s_client.CoreV1Api(self._api)
        result = await core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                                _request_timeout=10)
        return [self._api.sanitize_for_serialization(p) for p in result.items]

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
