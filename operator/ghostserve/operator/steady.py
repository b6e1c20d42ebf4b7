"""Steady state of a deployment: one pod per replica, stale pods rolled one replica at a time, sidecar
groups reset when the settings they were created with change, removed replicas' groups freed.

`status.sidecarGroups` lists which node's sidecar holds each replica's group and the group settings
hash it was created with (pods.group_hash). It is written before the pod that needs it is created,
so an operator killed half-way still knows which group to reset or free.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import kopf
from ghostserve.operator import faults, gatewayaccess, kube, specs, status
from ghostserve.operator import pods as podmodel

if TYPE_CHECKING:
    from ghostserve.operator.loopstate import LoopState as Reconciler

SIDECAR_ATTEMPTS = 3
log = logging.getLogger("ghostserve.operator")


def groups_of(loop: Reconciler) -> dict[int, dict[str, Any]]:
    return {int(g["replica"]): dict(g) for g in loop.status.get("sidecarGroups") or [] if "replica" in g}


async def save_groups(loop: Reconciler, groups: Mapping[int, Mapping[str, Any]]) -> None:
    await loop.persist(sidecarGroups=[dict(groups[r]) for r in sorted(groups)])


async def delete_group(loop: Reconciler, spec: Mapping[str, Any], replica: int, node: str, why: str) -> bool:
    """DeleteGroup of a replica's group on `node`'s sidecar; False when it must be retried."""
    view_node = loop.rt.view.node(node)
    down = faults.classify_node(view_node) if view_node is not None else None
    if loop.rt.view.node_deleted(node) or (down is not None and down.reason == "NodeNotReady"):
        return True  # the node (and its sidecar's copy) is gone or unreachable: nothing to free
    key = f"delete:{replica}:{node}"
    try:
        await loop.rt.sidecars.delete_group(loop.address(node, spec), loop.group_id(replica))
    except Exception as exc:  # unreachable sidecar: retry a few passes, then its KV is gone with it
        tries = loop.tries.get(key, 0) + 1
        loop.tries[key] = tries
        message = f"DeleteGroup {loop.group_id(replica)} on {node}: {exc}"
        kopf.warn(loop.body, reason="SidecarError", message=message)
        return tries >= SIDECAR_ATTEMPTS
    loop.log.info("group-deleted", extra={"group": loop.group_id(replica), "node": node, "why": why})
    return True


async def ensure(loop: Reconciler, spec: Mapping[str, Any], pods: Mapping[int, Any]) -> None:
    """Create missing replica pods (after resetting a group whose settings changed), delete pods of
    removed replicas and free their groups, roll one stale replica at a time when all are ready."""
    replicas = int(spec["engine"]["replicas"])
    want_hash = podmodel.group_hash(spec)
    groups = groups_of(loop)
    changed = False
    for replica in range(replicas):
        if replica in pods or replica in loop.in_flight:
            continue
        held = groups.get(replica)
        if held and held.get("hash") != want_hash and held.get("node"):
            if not loop.rt.settled():
                continue  # the replica's old pod may still run, just not listed yet: never reset its KV
            if not await delete_group(loop, spec, replica, held["node"], "group settings changed"):
                continue
            kopf.event(
                loop.body,
                type="Normal",
                reason="SidecarGroupReset",
                message=f"replica {replica}: world size or protection changed; sidecar group "
                f"{loop.group_id(replica)} on {held['node']} deleted, its KV is recomputed",
            )
            groups.pop(replica)
            changed = True
        manifest = podmodel.build_replica_pod(
            loop.namespace, loop.name, spec, replica, node_access=loop.rt.config.node_access
        )
        await loop.rt.kube.create_pod(loop.namespace, loop.adopted(manifest))
    if changed:
        await save_groups(loop, groups)
    for replica, pod in sorted(pods.items()):
        if replica >= replicas and replica not in loop.in_flight:
            await _delete(loop, pod)
    await release_removed(loop, spec, pods)
    watch_health(loop, spec, pods)
    await observe_groups(loop, spec, pods)
    await roll(loop, spec, pods)
    await ensure_gateway(loop)


async def ensure_gateway(loop: Reconciler) -> None:
    """One resume gateway pod per deployment (when the operator has a gateway image); a failed one is
    replaced. status.gatewayURL names the client Service in front of it."""
    image = loop.rt.config.gateway_image
    if not image:
        return
    gateway = loop.rt.view.gateway(loop.key)
    if gateway is not None:
        loop.gateway_requested = False  # the watch shows it: from now on the view says whether it exists
        if (gateway.get("status") or {}).get("phase") in {"Failed", "Succeeded"}:
            await _delete(loop, gateway)
            return  # its DELETED event brings us back to create the new one
    elif not loop.gateway_requested:
        # Its identity first: a pod naming a ServiceAccount that does not exist is refused.
        kube_api = loop.rt.kube
        account = gatewayaccess.build_service_account(loop.namespace, loop.name)
        await kube_api.create_service_account(loop.namespace, loop.adopted(account))
        role = loop.rt.config.gateway_role
        binding = gatewayaccess.build_role_binding(loop.namespace, loop.name, role)
        await kube_api.create_role_binding(loop.namespace, loop.adopted(binding))
        manifest = podmodel.build_gateway_pod(loop.namespace, loop.name, image)
        await kube_api.create_pod(loop.namespace, loop.adopted(manifest))
        loop.gateway_requested = True
    url = f"http://{loop.name}.{loop.namespace}.svc:{specs.GATEWAY_PORT}"
    if loop.status.get("gatewayURL") != url:
        await loop.persist(gatewayURL=url)


async def ensure_service(loop: Reconciler) -> None:
    """The client Service, checked by each loop until it is there (normally its first pass only): the
    create/update handler creates it, this re-creates one deleted while no operator ran. A read in the
    usual case (it exists). A Service that is not ours, or an API error, does not stop the replicas:
    it is logged and checked again on the next pass (the create/update handler posts the NotOwned
    Event and Ready=False, once per spec change)."""
    if loop.service_ensured:
        return
    service = loop.adopted(specs.build_service(loop.namespace, loop.name))
    try:
        await loop.rt.kube.ensure_service(loop.namespace, service)
    except kube.KubeError as exc:  # NotOwned included
        if f"service:{exc}" not in loop.warned:  # the module logger: kopf's would post an Event per line
            loop.warned.add(f"service:{exc}")
            log.warning("service-check-failed", extra={"deployment": "/".join(loop.key), "error": str(exc)})
        return
    loop.service_ensured = True


def watch_health(loop: Reconciler, spec: Mapping[str, Any], pods: Mapping[int, Any]) -> None:
    """Keep a health stream open to the sidecar of every node running one of the replicas (no I/O
    here: the runtime starts the stream, once per sidecar). Also called before a loop's first pass
    is admitted: the sidecar replays its faulty GPUs to a new stream, so a GPU that failed while no
    operator ran makes its deployment urgent (firstpass.py) without waiting for its turn."""
    for pod in pods.values():
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            loop.rt.ensure_health_watch(node, loop.port(spec), loop_fault_handler(loop))


def loop_fault_handler(loop: Reconciler) -> Any:
    def on_fault(fault: Any) -> None:
        loop.rt.view.put_gpu_fault(fault)
        for key in loop.rt.view.deployments_on(fault.node or ""):
            loop.rt.wake(key)

    return on_fault


async def release_removed(loop: Reconciler, spec: Mapping[str, Any], pods: Mapping[int, Any]) -> None:
    """Free the groups of replicas scaled away, once their pods are gone."""
    replicas = int(spec["engine"]["replicas"])
    groups = groups_of(loop)
    if not loop.rt.settled():
        return
    gone = [r for r in groups if r >= replicas and r not in pods and r not in loop.in_flight]
    for replica in gone:
        node = groups[replica].get("node")
        if node and not await delete_group(loop, spec, replica, node, "replica removed"):
            return
        groups.pop(replica)
    if gone:
        await save_groups(loop, groups)


async def observe_groups(loop: Reconciler, spec: Mapping[str, Any], pods: Mapping[int, Any]) -> None:
    """Record where each running replica's group lives; free a copy left on a node it no longer runs on."""
    groups = groups_of(loop)
    before = {r: dict(g) for r, g in groups.items()}
    for replica, pod in pods.items():
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or replica in loop.in_flight or not status.pod_ready(pod):
            continue
        held = groups.get(replica)
        hash_ = (pod["metadata"].get("annotations") or {}).get(podmodel.GROUP_HASH_ANNOTATION, "")
        moved = bool(held and held.get("node") and held["node"] != node and held.get("hash") == hash_)
        # Recreated elsewhere outside a recovery (roll, scheduler's choice): the old copy only costs memory.
        if moved and held and not await delete_group(loop, spec, replica, held["node"], f"now on {node}"):
            continue
        groups[replica] = {"replica": replica, "node": node, "hash": hash_}
    if groups != before:
        await save_groups(loop, groups)


async def roll(loop: Reconciler, spec: Mapping[str, Any], pods: Mapping[int, Any]) -> None:
    """Delete the lowest replica whose pod was built from another spec, while every replica is ready
    and no recovery runs. Freshly created pods carry the current hash, so they are never rolled."""
    replicas = int(spec["engine"]["replicas"])
    if loop.in_flight or not all(status.pod_ready(pods.get(r)) for r in range(replicas)):
        return
    current = podmodel.spec_hash(spec)
    for replica in range(replicas):
        pod = pods[replica]
        if (pod["metadata"].get("annotations") or {}).get(specs.SPEC_HASH_ANNOTATION) != current:
            loop.log.info("replica-rolling", extra={"replica": replica, "spec_hash": current})
            await _delete(loop, pod)
            return


async def _delete(loop: Reconciler, pod: Mapping[str, Any]) -> None:
    await loop.rt.kube.delete_pod(loop.namespace, pod["metadata"]["name"], uid=pod["metadata"].get("uid"))
