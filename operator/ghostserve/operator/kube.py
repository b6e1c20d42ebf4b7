"""The operator's only Kubernetes writer besides kopf itself: pods, Services, CR status.

Thin async wrappers over kubernetes_asyncio's ApiClient that send plain dicts and read plain JSON
(no model (de)serialisation: it costs more than the request at hundreds of pods). Idempotency
is decided here once: creating what exists and deleting what is gone both count as success.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import kubernetes_asyncio.client as k8s_client
import kubernetes_asyncio.config as k8s_config
from ghostserve.operator import specs
from kubernetes_asyncio.client.exceptions import ApiException

MERGE_PATCH = "application/merge-patch+json"


class KubeError(RuntimeError):
    """An API call failed with an HTTP status other than the ones the caller treats as success."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


async def connect() -> k8s_client.ApiClient:
    """An API client from the in-cluster service account, else from KUBECONFIG / ~/.kube/config."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        await k8s_config.load_kube_config()
    return k8s_client.ApiClient()


class Kube:
    """Calls used by the operator. Every method raises KubeError on unexpected HTTP statuses."""

    def __init__(self, api: k8s_client.ApiClient) -> None:
        self._api = api

    async def close(self) -> None:
        await self._api.close()

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        ok: frozenset[int] = frozenset(),
    ) -> dict[str, Any] | None:
        """JSON of the response, or None when the status is in `ok` (e.g. 404 on delete)."""
        try:
            response = await self._api.call_api(
                path,
                method,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                response_types_map={},
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=30,
            )
            raw = await response.read()
            response.release()
        except ApiException as exc:
            if exc.status in ok:
                return None
            raise KubeError(int(exc.status or 0), str(exc.reason)) from exc
        # Without preloading, kubernetes_asyncio does not check the status: every non-2xx is ours to judge.
        if not 200 <= response.status < 300:
            if response.status in ok:
                return None
            raise KubeError(int(response.status), raw.decode(errors="replace")[:300])
        parsed: dict[str, Any] = json.loads(raw) if raw else {}
        return parsed

    async def create_pod(self, namespace: str, pod: Mapping[str, Any]) -> bool:
        """True when created, False when a pod of that name already exists."""
        return (
            await self._call("POST", f"/api/v1/namespaces/{namespace}/pods", dict(pod), ok=frozenset({409}))
            is not None
        )

    async def delete_pod(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete at once (grace 0: the rank is already dead); only the pod with `uid` when given.

        False when it is already gone or was replaced (UID precondition failed)."""
        options: dict[str, Any] = {"gracePeriodSeconds": 0, "propagationPolicy": "Background"}
        if uid:
            options["preconditions"] = {"uid": uid}
        return (
            await self._call(
                "DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", options, ok=frozenset({404, 409})
            )
            is not None
        )

    async def create_service(self, namespace: str, service: Mapping[str, Any]) -> bool:
        return (
            await self._call(
                "POST", f"/api/v1/namespaces/{namespace}/services", dict(service), ok=frozenset({409})
            )
            is not None
        )

    async def delete_service(self, namespace: str, name: str) -> bool:
        return (
            await self._call("DELETE", f"/api/v1/namespaces/{namespace}/services/{name}", ok=frozenset({404}))
            is not None
        )

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        """Merge-patch the deployment's status subresource; False when the deployment is gone."""
        path = f"/apis/{specs.GROUP}/{specs.VERSION}/namespaces/{namespace}/{specs.PLURAL}/{name}/status"
        return (
            await self._call(
                "PATCH", path, {"status": dict(status)}, content_type=MERGE_PATCH, ok=frozenset({404})
            )
            is not None
        )
