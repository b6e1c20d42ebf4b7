"""kopf handlers: thin adapters from kopf's callbacks to the reconciler, the view and the API.

Importing this module registers the handlers in kopf's default registry (`ghostserve operator`
does; so does `kopf run -m ghostserve.operator.handlers`). Per-run state lives in `memo.runtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf
from ghostserve.operator import (
    backoff,
    conditions,
    firstpass,
    kube,
    metrics,
    podpolicy,
    pods,
    reconcile,
    runtime,
    sidecars,
    specs,
)

log = logging.getLogger("ghostserve.operator")
CR = (specs.GROUP, specs.VERSION, specs.PLURAL)
RANK_PODS = {specs.APP_LABEL: specs.APP_VALUE}
IN_FLIGHT_KEY = "in_flight"  # memo: deployment key -> a recovery is recorded in its status
POD_NODES_KEY = "pod_nodes"  # memo: (namespace, pod) -> node name ("" while unscheduled)
DEFAULT_SIDECAR_PORT = 7443  # only fills {port} of a template main.config_from did not fill


def _owned_by_deployment(pod: Mapping[str, Any]) -> bool:
    """A pod is ours only when its controller is the GhostServeDeployment its label names: a look-alike
    pod with our labels is neither adopted, rolled nor deleted."""
    meta = pod.get("metadata") or {}
    name = (meta.get("labels") or {}).get(specs.DEPLOYMENT_LABEL)
    return any(
        ref.get("controller")
        and ref.get("kind") == specs.KIND
        and str(ref.get("apiVersion", "")).startswith(f"{specs.GROUP}/")
        and ref.get("name") == name
        for ref in meta.get("ownerReferences") or []
    )


def _node_gone(
    rt: runtime.Runtime, pod_nodes: Mapping[tuple[str, str], str], namespace: str, name: str
) -> bool:
    """Grace 0 is safe only when no kubelet can still run the container: never bound, or node deleted."""
    node = pod_nodes.get((namespace, name))
    return node == "" or (node is not None and rt.view.node_deleted(node))


async def report(
    rt: runtime.Runtime, body: kopf.Body, reason: str, message: str, generation: int | None = None
) -> None:
    """A Warning Event and Ready=False with the API's message (best effort: the API may be the problem)."""
    kopf.warn(body, reason=reason, message=message[:1000])
    meta = body.get("metadata") or {}
    ready_false = conditions.with_ready_false(
        (body.get("status") or {}).get("conditions") or [],
        reason=reason,
        message=message,
        generation=generation if generation is not None else meta.get("generation"),
        now=reconcile.now_iso(),
    )
    with contextlib.suppress(Exception):
        await rt.kube.patch_status(str(meta["namespace"]), str(meta["name"]), {"conditions": ready_false})


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, kube.NotOwned):
        return "NotOwned"
    if isinstance(exc, podpolicy.PolicyError):
        return "PodPolicy"
    if isinstance(exc, kube.KubeError) and 400 <= exc.status < 500 and exc.status != 409:
        return "PodRejected" if exc.status == 422 else f"ApiError{exc.status}"
    return "ReconcileError"


class SpecEssence(kopf.AnnotationsDiffBaseStorage):
    """kopf's own essence of an object (spec, labels, annotations: what create/update compare), built
    without deep-copying the status first. kopf copies the whole body and then drops the status, which
    for a deployment (ranks table, conditions, records) is most of it, on every event: a thousand
    times over at an operator's start. The essence, and so the stored annotation, is the same.

    kopf builds it for every event of every watched kind; for pods and nodes (only watched: no
    create/update handler or daemon compares their essence) it is empty instead of a deep copy of a
    pod's spec per event."""

    WATCH_ONLY = frozenset({"Pod", "Node"})

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if body.get("kind") in self.WATCH_ONLY and not extra_fields:
            return cast(kopf.BodyEssence, {})
        if extra_fields:  # a handler watching status fields needs them: kopf's own way
            return super().build(body=body, extra_fields=extra_fields)
        slim = kopf.Body(cast(kopf.RawBody, {k: v for k, v in body.items() if k != "status"}))
        return super().build(body=slim, extra_fields=extra_fields)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    config: runtime.Config = memo.get("config") or runtime.Config()
    settings.persistence.finalizer = "ghostserve.io/finalizer"
    settings.persistence.diffbase_storage = SpecEssence()  # same prefix and key as kopf's default
    # No CRD or namespace scanning: the CRD is installed before the operator (Helm's crds/) and the
    # namespaces are exact names, so kopf needs no cluster-wide list/watch of CRDs or namespaces (RBAC).
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING  # handler logs; our own Events are posted explicitly
    settings.batching.batch_window = 0.02  # fault signals must not wait for a burst to settle
    api = await kube.connect()
    port = sidecars.GrpcSidecars(timeout=config.sidecar_timeout_seconds, tls=config.tls)
    rt = runtime.Runtime(config, kube.Kube(api, policy=memo.get("policy")), port)
    pod_nodes: dict[tuple[str, str], str] = {}
    rt.kube.node_gone = lambda namespace, name: _node_gone(rt, pod_nodes, namespace, name)
    rt.kube.fence = memo.get("fence")  # leader election: no write once the Lease may be lost
    in_flight: dict[Any, bool] = {}
    # The gauge is the number of deployments with a recorded recovery, not a count of starts minus ends
    # (which a restart in the middle of a recovery leaves at 1 or -1 for good).
    metrics.IN_FLIGHT.set_function(lambda: sum(in_flight.values()))
    memo[POD_NODES_KEY], memo[IN_FLIGHT_KEY], memo["runtime"] = pod_nodes, in_flight, rt


@kopf.on.cleanup()
async def stop(memo: Any, **_: Any) -> None:
    if "runtime" in memo:
        await memo["runtime"].close()


# No resume handler: on an operator's start every deployment's control loop does what it would (the
# Service is checked in the loop's first pass), in the order firstpass.py sets; a thousand resume
# handlers at once would each call the API before any fault is handled.
@kopf.on.create(*CR)
@kopf.on.update(*CR)
async def reconcile_spec(
    name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any
) -> None:
    """Validate the spec and create the Service; the control loop creates and rolls the pods."""
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
                "observedGeneration": (body.get("metadata") or {}).get("generation"),
            }
        ]
        kopf.warn(body, reason="InvalidSpec", message=str(exc)[:1000])
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    rt: runtime.Runtime = memo["runtime"]
    assert namespace is not None  # the resource is namespaced
    service = specs.build_service(namespace, name)
    kopf.adopt(service, owner=body)
    try:
        await rt.kube.create_service(namespace, service)
    except kube.NotOwned as exc:
        await report(rt, body, "NotOwned", exc.message)
        raise kopf.TemporaryError(exc.message, delay=15.0) from exc
    rt.wake((namespace, name))


@kopf.daemon(*CR, cancellation_timeout=2.0)
async def control_loop(
    body: kopf.Body, memo: Any, logger: kopf.Logger, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """Wake on a signal (pod, node, GPU event) or every resync period, and reconcile once. The first
    pass waits for its turn (firstpass.py): urgent deployments at once, healthy ones a few at a time."""
    rt: runtime.Runtime = memo["runtime"]
    loop = reconcile.Reconciler(rt, body, logger)
    waker = rt.waker(loop.key)
    # Per object, not per name: a deployment deleted and created again must not release the new one's turn.
    turn = (loop.key, str((body.get("metadata") or {}).get("uid") or ""))
    released = False

    def first_done() -> None:
        nonlocal released
        if not released:
            released = True
            rt.first_passes.done(turn)

    try:
        urgent = False
        if firstpass.waits_for_turn(loop.status):
            urgent = await rt.first_passes.turn(turn, loop.urgent, waker, stopped)
        else:
            released = True  # never queued: nothing to release
        expiry = asyncio.get_running_loop().call_later(firstpass.SLOT_SECONDS, first_done)
        if urgent:
            admission = rt.first_passes.admission
            log.info(
                "first-pass-urgent",
                extra={
                    "deployment": "/".join(loop.key),
                    "routine_waiting": admission.waiting(urgent=False),
                    "running": admission.running(),
                },
            )
        try:
            await _run(rt, loop, waker, stopped, memo, first_done)
        finally:
            expiry.cancel()
    finally:
        first_done()  # a no-op once the first pass released it


async def _run(
    rt: runtime.Runtime,
    loop: reconcile.Reconciler,
    waker: asyncio.Event,
    stopped: kopf.DaemonStopped,
    memo: Any,
    first_done: Callable[[], None],
) -> None:
    body = loop.body
    retry = backoff.Backoff(base=1.0, cap=max(rt.config.resync_seconds, 1.0) * 10)
    reported: tuple[str, str] | None = None
    while not stopped:
        waker.clear()
        try:
            delay = await loop.step()
        except Exception as exc:  # API errors, rejected pods, sidecar errors: report, back off; never die
            wait = retry.fail()
            reason, message = failure_reason(exc), str(exc)
            # The module logger, not kopf's object logger (whose warnings become Events): `report` posts
            # one Event per distinct failure, not one per retry.
            log.warning(
                f"reconcile failed ({reason}), retrying in {wait:.1f}s: {exc!r}",
                extra={"reason": reason, "retry_s": round(wait, 1), "error": repr(exc)},
            )
            fenced = rt.kube.fence is not None and not rt.kube.fence()  # not the leader: say nothing
            if (reason, message) != reported and not fenced:  # one Event per distinct failure, not per retry
                await report(rt, body, reason, message)
                reported = (reason, message)
            delay = wait
        else:
            if reported is not None:
                loop.published = {}  # the next pass rewrites the conditions the failure report replaced
                reported = None
            retry.succeed()
        first_done()  # the first pass ended (well or not): the next routine one may start
        memo[IN_FLIGHT_KEY][loop.key] = bool(getattr(loop, "status", {}).get("inFlight"))
        if delay is not None and retry.failures:
            timeout = delay  # a backoff may exceed the resync period
        else:
            timeout = rt.config.resync_seconds if delay is None else min(delay, rt.config.resync_seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waker.wait(), timeout=timeout)


@kopf.on.delete(*CR, retries=5, backoff=2.0)
async def release(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    status: kopf.Status,
    memo: Any,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Delete rank pods and the Service, then free the groups' KV and parity on every sidecar used."""
    rt: runtime.Runtime = memo["runtime"]
    assert namespace is not None  # the resource is namespaced
    key = (namespace, name)
    memo[IN_FLIGHT_KEY].pop(key, None)
    nodes: dict[int, set[str]] = {}  # replica -> nodes whose sidecar may hold its group
    for replica, pod in rt.view.pods(key).items():
        nodes.setdefault(replica, set()).add((pod.get("spec") or {}).get("nodeName") or "")
        await rt.kube.delete_pod(namespace, pod["metadata"]["name"], uid=pod["metadata"].get("uid"))
    for row in status.get("ranks") or []:
        nodes.setdefault(int(row["group"]), set()).add(row.get("node") or "")
    # Only the Service this deployment created (a pre-existing one of the same name is left alone).
    await rt.kube.delete_service(namespace, name, owner_uid=(body.get("metadata") or {}).get("uid"))
    for replica, on in sorted(nodes.items()):
        for node in sorted(n for n in on if n):
            try:
                # The port is fixed into the address template from the chart (main.config_from).
                address = rt.sidecar_address(node, DEFAULT_SIDECAR_PORT)
                await rt.sidecars.delete_group(address, pods.sidecar_group_id(namespace, name, replica))
            except Exception as exc:
                raise kopf.TemporaryError(f"DeleteGroup on {node}: {exc}", delay=2.0) from exc
    rt.forget(key)
    logger.info("groups-released", extra={"groups": len(nodes)})


# The event handlers are coroutines: kopf runs a plain function in a thread pool, one hop per event
# (a thousand at an operator's start), and an asyncio.Event set from another thread (rt.wake) is not
# guaranteed to wake the loop.
@kopf.on.event("pods", labels=RANK_PODS)
async def pod_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    rt: runtime.Runtime = memo["runtime"]
    pod = event["object"]
    if not _owned_by_deployment(pod):
        return
    meta = pod.get("metadata") or {}
    where = (str(meta.get("namespace")), str(meta.get("name")))
    if event["type"] == "DELETED":
        memo[POD_NODES_KEY].pop(where, None)
        key = rt.view.drop_pod(pod)
    else:
        memo[POD_NODES_KEY][where] = (pod.get("spec") or {}).get("nodeName") or ""
        key = rt.view.put_pod(pod)
    rt.wake(key)


@kopf.on.event("nodes")
async def node_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    rt: runtime.Runtime = memo["runtime"]
    node = event["object"]
    name = node["metadata"]["name"]
    if event["type"] == "DELETED":
        rt.view.drop_node(name)
    else:
        rt.view.put_node(node)
    for key in rt.view.deployments_on(name):
        rt.wake(key)
