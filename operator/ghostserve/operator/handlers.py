"""kopf handlers: thin adapters from kopf's callbacks to the reconciler, the view and the API.

Importing this module registers the handlers in kopf's default registry (`ghostserve operator`
does; so does `kopf run -m ghostserve.operator.handlers`). Per-run state lives in `memo.runtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf
from ghostserve.operator import kube, reconcile, runtime, sidecars, specs

CR = (specs.GROUP, specs.VERSION, specs.PLURAL)
RANK_PODS = {specs.APP_LABEL: specs.APP_VALUE}


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    config: runtime.Config = memo.get("config") or runtime.Config()
    settings.persistence.finalizer = "ghostserve.io/finalizer"
    settings.posting.level = logging.WARNING  # handler logs; our own Events are posted explicitly
    settings.batching.batch_window = 0.02  # fault signals must not wait for a burst to settle
    api = await kube.connect()
    port = sidecars.GrpcSidecars(timeout=config.sidecar_timeout_seconds, tls=config.tls)
    memo["runtime"] = runtime.Runtime(config, kube.Kube(api), port)


@kopf.on.cleanup()
async def stop(memo: Any, **_: Any) -> None:
    if "runtime" in memo:
        await memo["runtime"].close()


@kopf.on.resume(*CR)
@kopf.on.create(*CR)
@kopf.on.update(*CR)
async def reconcile_spec(
    name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any
) -> None:
    """Validate the spec and ensure the Service; the control loop creates and rolls the pods."""
    try:
        specs.checked(name, spec)
    except specs.SpecError as exc:
        patch.status["phase"] = "Failed"
        patch.status["conditions"] = [
            {
                "type": "Ready",
                "status": "False",
                "reason": "InvalidSpec",
                "message": str(exc)[:1000],
                "lastTransitionTime": reconcile.now_iso(),
            }
        ]
        kopf.warn(body, reason="InvalidSpec", message=str(exc)[:1000])
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    rt: runtime.Runtime = memo["runtime"]
    assert namespace is not None  # the resource is namespaced
    service = specs.build_service(namespace, name)
    kopf.adopt(service, owner=body)
    await rt.kube.create_service(namespace, service)
    rt.wake((namespace, name))


@kopf.daemon(*CR, cancellation_timeout=2.0)
async def control_loop(
    body: kopf.Body, memo: Any, logger: kopf.Logger, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """Wake on a signal (pod, node, GPU event) or every resync period, and reconcile once."""
    rt: runtime.Runtime = memo["runtime"]
    loop = reconcile.Reconciler(rt, body, logger)
    waker = rt.waker(loop.key)
    while not stopped:
        waker.clear()
        try:
            delay = await loop.step()
        except Exception as exc:  # API 5xx/409, sidecar errors: log, retry soon; the loop must survive
            logger.warning(f"reconcile failed, retrying: {exc!r}")
            delay = 1.0
        timeout = rt.config.resync_seconds if delay is None else min(delay, rt.config.resync_seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waker.wait(), timeout=timeout)


@kopf.on.delete(*CR, retries=5, backoff=2.0)
async def release(
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    status: kopf.Status,
    memo: Any,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Delete rank pods and the Service, then free the groups' KV and parity on every sidecar used."""
    rt: runtime.Runtime = memo["runtime"]
    assert namespace is not None  # the resource is namespaced
    key = (namespace, name)
    nodes: dict[int, set[str]] = {}
    for (group, _rank), pod in rt.view.pods(key).items():
        nodes.setdefault(group, set()).add((pod.get("spec") or {}).get("nodeName") or "")
        await rt.kube.delete_pod(namespace, pod["metadata"]["name"])
    for row in status.get("ranks") or []:
        nodes.setdefault(int(row["group"]), set()).add(row.get("node") or "")
    await rt.kube.delete_service(namespace, name)
    port = int((spec.get("sidecar") or {}).get("port", 7443))
    for group, on in sorted(nodes.items()):
        for node in sorted(n for n in on if n):
            try:
                await rt.sidecars.delete_group(
                    rt.sidecar_address(node, port), specs.sidecar_group_id(namespace, name, group)
                )
            except Exception as exc:
                raise kopf.TemporaryError(f"DeleteGroup on {node}: {exc}", delay=2.0) from exc
    rt.forget(key)
    logger.info(f"released {len(nodes)} groups")


@kopf.on.event("pods", labels=RANK_PODS)
def pod_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    rt: runtime.Runtime = memo["runtime"]
    pod = event["object"]
    key = rt.view.drop_pod(pod) if event["type"] == "DELETED" else rt.view.put_pod(pod)
    rt.wake(key)


@kopf.on.event("nodes")
def node_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    rt: runtime.Runtime = memo["runtime"]
    node = event["object"]
    name = node["metadata"]["name"]
    if event["type"] == "DELETED":
        rt.view.drop_node(name)
    else:
        rt.view.put_node(node)
    for key in rt.view.deployments_on(name):
        rt.wake(key)
