"""The embedded cluster's Kubernetes API server: kmock's KubernetesEmulator with what kopf needs.

kmock 0.8 keeps no resourceVersion, does not understand JSON patches (kopf's finalizer patch is a
JSON patch with a `test` op on resourceVersion), and its watches ignore `?resourceVersion=` and can
miss writes made between the initial listing and the watch. This subclass adds:

- a cluster-wide resourceVersion counter, uid, creationTimestamp and generation (bumped on spec
  changes) on every object;
- JSON patches (test/add/replace/remove) with 422 on a failed test; merge patches as kmock does;
- watches that resume from `resourceVersion` via an event log (410 Gone when it is too old), mark
  the event bus under the same lock as the snapshot, and filter by `labelSelector`;
- delete with `preconditions.uid` (409 on mismatch) and finalizers (deletionTimestamp first);
- with `graceful_pods`, graceful deletion of pods bound to a node as a real API server does: the
  delete sets deletionTimestamp + deletionGracePeriodSeconds and the node's kubelet removes the object
  (a delete with grace 0) once the containers stopped; grace 0 deletes at once;
- fault injection: `inject(status, count, ...)` makes matching requests fail; `drop_watches()`
  ends every open watch stream (the client must re-watch from its last resourceVersion).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import datetime
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import apps, dicts, enums, references, rendering

_DROP = {"type": "__DROP__"}
LOG_LIMIT = 200_000


@dataclasses.dataclass
class Injection:
    status: int
    count: int
    method: str | None = None  # e.g. "PATCH"; None: any
    plural: str | None = None  # e.g. "pods"; None: any
    watch: bool = False  # match watch requests (else only non-watch ones)


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 subset used by kubectl/kopf; raises kmock.KubernetesError(422) when a test fails."""
    out = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = out
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else ""
        kind = op["op"]
        if kind == "test":
            current = (parent[int(last)] if isinstance(parent, list) else parent.get(last)) if parts else out
            if current != op.get("value"):
                raise kmock.KubernetesError(
                    status=422,
                    reason="Invalid",
                    message=f"test failed at {op['path']}: {current!r} != {op.get('value')!r}",
                )
        elif kind in {"add", "replace"}:
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"unsupported op {kind}")
    return out


def _labels_match(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k) != v.lstrip("="):
                return False
        elif term and term not in labels:
            return False
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    rv: int = attrs.field(default=0, init=False)
    log: collections.deque[tuple[int, Any, dict[str, Any]]] = attrs.field(
        factory=lambda: collections.deque(maxlen=LOG_LIMIT), init=False
    )
    injections: list[Injection] = attrs.field(factory=list, init=False)
    # Test hooks: called (in the server loop) after each successful write, with (action, resource, object).
    listeners: list[Any] = attrs.field(factory=list, init=False)
    namespaces: list[str] = attrs.field(factory=lambda: ["test"])
    graceful_pods: bool = False

    # ---- fault injection ----------------------------------------------------------------------
    def inject(
        self,
        status: int,
        count: int = 1,
        *,
        method: str | None = None,
        plural: str | None = None,
        watch: bool = False,
    ) -> Injection:
        injection = Injection(status, count, method, plural, watch)
        self.injections.append(injection)
        return injection

    async def drop_watches(self) -> None:
        async with self._lock:
            for bus in list(self._buses.values()):
                await bus.put(_DROP)

    def _injected(self, request: rendering.Request) -> kmock.KubernetesError | None:
        is_watch = request.action == enums.action.WATCH
        for inj in self.injections:
            if inj.count <= 0 or inj.watch != is_watch:
                continue
            if inj.method and str(request.method.value).upper() != inj.method:
                continue
            if inj.plural and (request.resource is None or request.resource.plural != inj.plural):
                continue
            inj.count -= 1
            reason = {409: "Conflict", 500: "InternalError", 503: "ServiceUnavailable"}.get(
                inj.status, "Injected"
            )
            return kmock.KubernetesError(status=inj.status, reason=reason, message="injected by the test")
        return None

    # ---- state changes ------------------------------------------------------------------------
    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)

    async def _emit(self, resource: Any, type_: str, raw: dict[str, Any]) -> None:
        event = {"type": type_, "object": copy.deepcopy(raw)}  # readers only serialise it or copy it
        self.log.append((self.rv, resource, event))
        await self._buses[resource].put(event)

    async def write(
        self, action: str, resource: Any, namespace: str | None, name: str | None, data: Any = None
    ) -> None:
        """Apply one write as the API server would; raises kmock.KubernetesError like it does."""
        async with self._lock:
            await self._write_locked(action, resource, namespace, name, data)

    async def _write_locked(
        self, action: str, resource: Any, namespace: str | None, name: str | None, data: Any
    ) -> None:
        objs: Any = self._objects  # keys are (resource, namespace, name); kmock types them narrower
        if action == "create":
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
            name = name or meta.get("name")
            namespace = namespace or meta.get("namespace")
            key = (resource, namespace, name)
            if key in objs and not objs[key].deleted:
                raise kmock.KubernetesError(
                    status=409, reason="AlreadyExists", message=f"{name} already exists"
                )
            if namespace is not None:
                meta["namespace"] = namespace
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            self._bump(data)
            if key in objs:
                objs[key].create(data)
            else:
                objs[key] = data
            await self._emit(resource, "ADDED", objs[key].raw)
            self._notify("create", resource, objs[key].raw)
            return
        key = (resource, namespace, name)
        if key not in objs or objs[key].deleted:
            raise kmock.KubernetesError(status=404, reason="NotFound", message=f"{name} not found")
        obj = objs[key]
        if action == "update":
            before = copy.deepcopy(obj.raw)
            if isinstance(data, list):
                raw = apply_json_patch(before, data)
            else:
                raw = dict(dicts.patch_dict(copy.deepcopy(before), data or {}))
            if raw.get("spec") != before.get("spec"):
                raw["metadata"]["generation"] = int(before["metadata"].get("generation", 1)) + 1
            self._bump(raw)
            obj.history.append(raw)
            meta = raw["metadata"]
            terminating = meta.get("deletionGracePeriodSeconds")  # the kubelet finishes the deletion
            if meta.get("deletionTimestamp") and not meta.get("finalizers") and not terminating:
                await self._delete_now(resource, key)
            else:
                await self._emit(resource, "MODIFIED", raw)
                self._notify("update", resource, raw)
            return
        if action == "delete":
            uid = ((data or {}).get("preconditions") or {}).get("uid") if isinstance(data, dict) else None
            if uid and obj.raw["metadata"].get("uid") != uid:
                raise kmock.KubernetesError(status=409, reason="Conflict", message="uid precondition failed")
            meta = obj.raw["metadata"]
            grace = self._grace(resource, obj.raw, data)
            if meta.get("finalizers") or grace:
                if not meta.get("deletionTimestamp"):
                    marks: dict[str, Any] = {"deletionTimestamp": _now()}
                    if grace:
                        marks["deletionGracePeriodSeconds"] = grace
                    obj.patch({"metadata": marks})
                    self._bump(obj.raw)
                    await self._emit(resource, "MODIFIED", obj.raw)
                    self._notify("update", resource, obj.raw)
            else:
                await self._delete_now(resource, key)

    def _grace(self, resource: Any, raw: dict[str, Any], options: Any) -> int:
        """Seconds a pod's containers get to stop before its object is removed (0: remove now)."""
        spec = raw.get("spec") or {}
        if not self.graceful_pods or resource != PODS or not spec.get("nodeName"):
            return 0
        if (raw.get("status") or {}).get("phase") in {"Failed", "Succeeded"}:
            return 0
        given = options.get("gracePeriodSeconds") if isinstance(options, dict) else None
        if given is None:
            given = spec.get("terminationGracePeriodSeconds", 30)
        return max(0, int(given))

    async def _delete_now(self, resource: Any, key: Any) -> None:
        raw = copy.deepcopy(self._objects[key].raw)
        self._bump(raw)
        self._objects[key].delete()
        await self._emit(resource, "DELETED", raw)
        self._notify("delete", resource, raw)

    def _notify(self, action: str, resource: Any, raw: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(action, resource, raw)

    # ---- request handling ---------------------------------------------------------------------
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8's path parser fails on the cluster-wide namespace listing kopf starts with.
        if raw_request.path == "/api/v1/namespaces":
            if raw_request.query.get("watch") != "true":
                items = [
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                    for ns in self.namespaces
                ]
                return aiohttp.web.json_response(
                    {"metadata": {"resourceVersion": str(self.rv)}, "items": items}
                )
            response = aiohttp.web.StreamResponse()
            await response.prepare(raw_request)
            await asyncio.Event().wait()  # namespaces never change here; the client cancels the stream
        return await super().__call__(raw_request)

    async def _handle(self, request: rendering.Request) -> Any:
        """Serve object requests directly. kmock's DSL matching re-scans every earlier request for
        each new one (quadratic: seconds per request at a few thousand); discovery still goes there."""
        injected = self._injected(request)
        if injected is not None:
            raise injected
        if request.resource is None or request.resource not in set(self._resources):
            return await apps.RawHandler._handle(self, request)
        action = request.action
        key: Any = (request.resource, request.namespace, request.name)
        if action == enums.action.LIST:
            return aiohttp.web.json_response(await self._serve_list(request))
        if action == enums.action.WATCH:
            return await self._stream(request)
        if action == enums.action.FETCH:
            async with self._lock:
                if key not in self._objects or self._objects[key].deleted:
                    raise kmock.KubernetesError(
                        status=404, reason="NotFound", message=f"{request.name} not found"
                    )
                return aiohttp.web.json_response(self._objects[key].raw)
        verb = {enums.action.CREATE: "create", enums.action.UPDATE: "update", enums.action.DELETE: "delete"}
        if action in verb and (request.name is not None or action == enums.action.CREATE):
            await self.write(verb[action], request.resource, request.namespace, request.name, request.data)
            if action == enums.action.CREATE:
                meta = request.data["metadata"]
                key = (request.resource, request.namespace or meta.get("namespace"), meta["name"])
            return aiohttp.web.json_response(
                self._objects[key].last.raw, status=201 if verb[action] == "create" else 200
            )
        return await apps.RawHandler._handle(self, request)

    async def _stream(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        raw_request = request._raw_request
        assert raw_request is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)
        try:
            async for item in self._serve_watch(request):
                if isinstance(item, dict):
                    await response.write(json.dumps(item).encode() + b"\n")
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the client went away
        return response

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        async with self._lock:
            items = [
                copy.deepcopy(o.raw)
                for (res, ns, _), o in self._objects.items()
                if res == request.resource
                and not o.deleted
                and (request.namespace is None or ns == request.namespace)
                and _labels_match(o.raw, request.params.get("labelSelector"))
            ]
            return {"metadata": {"resourceVersion": str(self.rv)}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""
        selector = request.params.get("labelSelector")
        since_raw = request.params.get("resourceVersion")
        since = int(since_raw) if since_raw and since_raw.isdigit() else None

        def wanted(event: dict[str, Any]) -> bool:
            meta = event["object"].get("metadata") or {}
            return (
                request.namespace is None or meta.get("namespace") == request.namespace
            ) and _labels_match(event["object"], selector)

        assert request.resource is not None
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            if since is None:
                backlog = [
                    {"type": "ADDED", "object": copy.deepcopy(o.raw)}
                    for (res, _, _), o in self._objects.items()
                    if res == request.resource and not o.deleted
                ]
            elif self.log and since < self.log[0][0] - 1 and len(self.log) == LOG_LIMIT:
                backlog = [
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "code": 410,
                            "reason": "Gone",
                            "message": "too old resource version",
                        },
                    }
                ]
            else:
                backlog = [
                    copy.deepcopy(e) for rv, res, e in self.log if rv > since and res == request.resource
                ]
            last = self.rv
        try:
            for event in backlog:
                if event["type"] == "ERROR" or wanted(event):
                    yield event
            async for event in bus.stream(since=marker):
                if event is _DROP or event.get("type") == "__DROP__":
                    return
                rv = int(event["object"]["metadata"].get("resourceVersion") or 0)
                if rv > last and wanted(event):
                    yield event
        finally:
            await bus.unmark(marker)


def declare(emulator: Emulator) -> None:
    """The resources kopf and the operator discover."""
    info = kmock.ResourceInfo
    emulator.resources["v1/pods"] = info(
        kind="Pod",
        singular="pod",
        namespaced=True,
        subresources=["status"],
        verbs=["list", "watch", "get", "create", "delete", "patch"],
    )
    emulator.resources["v1/nodes"] = info(
        kind="Node",
        singular="node",
        namespaced=False,
        subresources=["status"],
        verbs=["list", "watch", "get", "patch"],
    )
    emulator.resources["v1/services"] = info(
        kind="Service", singular="service", namespaced=True, verbs=["list", "get", "create", "delete"]
    )
    # Each deployment's resume gateway gets its own ServiceAccount and RoleBinding from the operator
    # (ghostserve.operator.gatewayaccess); this emulator stores them but enforces no RBAC.
    emulator.resources["v1/serviceaccounts"] = info(
        kind="ServiceAccount",
        singular="serviceaccount",
        namespaced=True,
        verbs=["list", "get", "create", "delete"],
    )
    emulator.resources["rbac.authorization.k8s.io/v1/rolebindings"] = info(
        kind="RoleBinding", singular="rolebinding", namespaced=True, verbs=["list", "get", "create", "delete"]
    )
    emulator.resources["v1/events"] = info(
        kind="Event", singular="event", namespaced=True, verbs=["create", "list", "watch"]
    )
    emulator.resources["v1/namespaces"] = info(
        kind="Namespace", singular="namespace", namespaced=False, verbs=["list", "watch", "get"]
    )
    emulator.resources["ghostserve.io/v1alpha1/ghostservedeployments"] = info(
        kind="GhostServeDeployment",
        singular="ghostservedeployment",
        namespaced=True,
        shortnames=["gsd"],
        subresources=["status"],
        verbs=["list", "watch", "get", "create", "delete", "patch", "update"],
    )


def resource(spec: str) -> references.resource:
    return references.resource(spec)


PODS = resource("v1/pods")
NODES = resource("v1/nodes")
SERVICES = resource("v1/services")
EVENTS = resource("v1/events")
SERVICEACCOUNTS = resource("v1/serviceaccounts")
ROLEBINDINGS = resource("rbac.authorization.k8s.io/v1/rolebindings")
