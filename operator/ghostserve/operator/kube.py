"""The operator's only Kubernetes writer besides kopf itself: pods, Services, the gateways'
ServiceAccounts and RoleBindings, CR status, its Lease.

Thin async wrappers over kubernetes_asyncio's ApiClient that send plain dicts and read plain JSON
(no model (de)serialisation: it costs more than the request at hundreds of pods). Idempotency and
ownership are decided here once: creating what exists counts as success only when the existing
object belongs to the same owner (else NotOwned), deleting what is gone counts as success, and an
object the deployment did not create is never deleted. Every pod passes `podpolicy.enforce` first.
`CALLS` lists every (API group, resource, verb) used here; the chart's RBAC grants exactly these plus
kopf's own (tests/operator/test_opsec_operator.py compares them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes_asyncio.client as k8s_client
import kubernetes_asyncio.config as k8s_config
from ghostserve.operator import podpolicy, specs
from kubernetes_asyncio.client.exceptions import ApiException

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
LEASES = "coordination.k8s.io"
RBAC = "rbac.authorization.k8s.io"

# (API group, resource, verb) of every call below: the RBAC contract of the application code.
CALLS = frozenset(
    {
        ("", "pods", "create"),
        ("", "pods", "get"),
        ("", "pods", "delete"),
        ("", "services", "create"),
        ("", "services", "get"),
        ("", "services", "delete"),
        ("", "serviceaccounts", "create"),
        ("", "serviceaccounts", "get"),
        (RBAC, "rolebindings", "create"),
        (RBAC, "rolebindings", "get"),
        (specs.GROUP, f"{specs.PLURAL}/status", "patch"),
        (LEASES, "leases", "get"),
        (LEASES, "leases", "create"),
        (LEASES, "leases", "patch"),
    }
)


class KubeError(RuntimeError):
    """An API call failed with an HTTP status other than the ones the caller treats as success."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class NotOwned(KubeError):
    """An object of the name the deployment needs exists and belongs to someone else: left alone."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        super().__init__(
            409,
            f"{kind} {namespace}/{name} already exists and was not created by this deployment "
            "(no matching ownerReference); it is left alone: delete or rename it",
        )
        self.kind = kind


def _api_message(raw: bytes) -> str:
    """The API server's Status message (what `kubectl` would print), else the raw body."""
    text = raw.decode(errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text[:1000]
    message = parsed.get("message") if isinstance(parsed, dict) else None
    return str(message or text)[:1000]


def owner_uids(obj: Mapping[str, Any] | None) -> set[str]:
    return {str(ref.get("uid")) for ref in ((obj or {}).get("metadata") or {}).get("ownerReferences") or []}


def _owner_uid(manifest: Mapping[str, Any]) -> str | None:
    """The uid of the controller owner the caller put on a manifest (kopf.adopt), if any."""
    refs = (manifest.get("metadata") or {}).get("ownerReferences") or []
    uids = [str(r["uid"]) for r in refs if r.get("controller") and r.get("uid")]
    return uids[0] if uids else None


async def connect() -> k8s_client.ApiClient:
    """An API client from the in-cluster service account, else from KUBECONFIG / ~/.kube/config."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        await k8s_config.load_kube_config()
    return k8s_client.ApiClient()


class Kube:
    """Calls used by the operator. Every method raises KubeError on unexpected HTTP statuses."""

    def __init__(
        self,
        api: k8s_client.ApiClient,
        *,
        policy: podpolicy.Policy | None = None,
        node_gone: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._api = api
        self.policy = policy or podpolicy.Policy()
        # (namespace, pod) -> True when the pod's node is confirmed gone (or it never had one): only then
        # is a pod deleted without a grace period. Wired by the handlers to the cluster view.
        self.node_gone = node_gone or (lambda _namespace, _name: False)
        # With leader election: False once this process may no longer be the leader (its last renewal
        # is older than the renew deadline, e.g. after a pause). Every write is refused from then on,
        # closing the gap between losing the Lease and the process exiting.
        self.fence: Callable[[], bool] | None = None

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
        if method != "GET" and self.fence is not None and not self.fence():
            raise KubeError(503, f"{method} {path} refused: this operator no longer holds the leader lease")
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
            message = _api_message(exc.body) if exc.body else str(exc.reason)
            raise KubeError(int(exc.status or 0), message) from exc
        # Without preloading, kubernetes_asyncio does not check the status: every non-2xx is ours to judge.
        if not 200 <= response.status < 300:
            if response.status in ok:
                return None
            raise KubeError(int(response.status), _api_message(raw))
        parsed: dict[str, Any] = json.loads(raw) if raw else {}
        return parsed

    async def _create_owned(
        self, kind: str, plural: str, namespace: str, manifest: Mapping[str, Any], *, api: str = "/api/v1"
    ) -> bool:
        """True when created; False when an object of that name with the same owner exists (an earlier
        attempt made it); NotOwned when it exists with another owner or none."""
        base = f"{api}/namespaces/{namespace}/{plural}"
        if await self._call("POST", base, dict(manifest), ok=frozenset({409})) is not None:
            return True
        name = manifest["metadata"]["name"]
        existing = await self._call("GET", f"{base}/{name}", ok=frozenset({404}))
        if existing is None:
            raise KubeError(409, f"{kind} {namespace}/{name} is being deleted; retrying")
        owner = _owner_uid(manifest)
        if owner is None or owner not in owner_uids(existing):
            raise NotOwned(kind, namespace, name)
        return False

    async def create_pod(self, namespace: str, pod: Mapping[str, Any]) -> bool:
        """True when created, False when this owner's pod of that name already exists.

        The pod passes the pod policy first (podpolicy.PolicyError: nothing is sent)."""
        return await self._create_owned("Pod", "pods", namespace, podpolicy.enforce(pod, self.policy))

    async def delete_pod(
        self, namespace: str, name: str, *, uid: str | None = None, force: bool = False
    ) -> bool:
        """Delete with the pod's grace period; at once (grace 0) only with `force` or when its node is
        confirmed gone, because a container on a partitioned node may still run and a replacement of
        the same name must not run beside it. Only the pod with `uid` when given.

        False when it is already gone or was replaced (UID precondition failed)."""
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        if force or self.node_gone(namespace, name):
            options["gracePeriodSeconds"] = 0
        if uid:
            options["preconditions"] = {"uid": uid}
        return (
            await self._call(
                "DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", options, ok=frozenset({404, 409})
            )
            is not None
        )

    async def create_service(self, namespace: str, service: Mapping[str, Any]) -> bool:
        """True when created, False when this owner's Service exists; NotOwned for anyone else's."""
        return await self._create_owned("Service", "services", namespace, service)

    async def ensure_service(self, namespace: str, service: Mapping[str, Any]) -> bool:
        """`create_service`, reading first: True when created, False when this owner's Service exists
        (one GET, the usual case on an operator's start); NotOwned for anyone else's."""
        name = service["metadata"]["name"]
        path = f"/api/v1/namespaces/{namespace}/services/{name}"
        existing = await self._call("GET", path, ok=frozenset({404}))
        if existing is None:
            return await self.create_service(namespace, service)
        owner = _owner_uid(service)
        if owner is None or owner not in owner_uids(existing):
            raise NotOwned("Service", namespace, name)
        return False

    async def create_service_account(self, namespace: str, account: Mapping[str, Any]) -> bool:
        """True when created, False when this owner's ServiceAccount exists; NotOwned for anyone else's."""
        return await self._create_owned("ServiceAccount", "serviceaccounts", namespace, account)

    async def create_role_binding(self, namespace: str, binding: Mapping[str, Any]) -> bool:
        """True when created, False when this owner's RoleBinding exists; NotOwned for anyone else's.
        The API server allows it only if the operator may `bind` the referenced role (the chart grants
        that for the gateway's ClusterRole alone)."""
        return await self._create_owned(
            "RoleBinding", "rolebindings", namespace, binding, api=f"/apis/{RBAC}/v1"
        )

    async def delete_service(self, namespace: str, name: str, *, owner_uid: str | None = None) -> bool:
        """Delete the Service only when `owner_uid` owns it (pinned by a UID precondition); a Service
        someone else created is never touched. False when gone or not ours."""
        path = f"/api/v1/namespaces/{namespace}/services/{name}"
        existing = await self._call("GET", path, ok=frozenset({404}))
        if existing is None or owner_uid is None or owner_uid not in owner_uids(existing):
            return False
        options = {"preconditions": {"uid": existing["metadata"]["uid"]}}
        return await self._call("DELETE", path, options, ok=frozenset({404, 409})) is not None

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        """Merge-patch the deployment's status subresource; False when the deployment is gone."""
        path = f"/apis/{specs.GROUP}/{specs.VERSION}/namespaces/{namespace}/{specs.PLURAL}/{name}/status"
        return (
            await self._call(
                "PATCH", path, {"status": dict(status)}, content_type=MERGE_PATCH, ok=frozenset({404})
            )
            is not None
        )

    # ---- leader election (ghostserve.operator.leader) -----------------------------------------
    def _lease_path(self, namespace: str, name: str | None = None) -> str:
        base = f"/apis/{LEASES}/v1/namespaces/{namespace}/leases"
        return f"{base}/{name}" if name else base

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call("GET", self._lease_path(namespace, name), ok=frozenset({404}))

    async def create_lease(self, namespace: str, lease: Mapping[str, Any]) -> dict[str, Any] | None:
        """The created Lease, or None when one of that name exists already (someone else was first)."""
        return await self._call("POST", self._lease_path(namespace), dict(lease), ok=frozenset({409}))

    async def replace_lease_spec(
        self, namespace: str, name: str, resource_version: str, spec: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Set the Lease's spec only if it is still at `resource_version` (a JSON patch whose `test` op
        fails when anyone wrote it since); None when someone else did."""
        ops = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
            {"op": "replace", "path": "/spec", "value": dict(spec)},
        ]
        return await self._call(
            "PATCH",
            self._lease_path(namespace, name),
            ops,
            content_type=JSON_PATCH,
            ok=frozenset({409, 422}),
        )
