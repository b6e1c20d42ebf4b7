"""The pod model: one pod per replica running the engine's own tensor-parallel process tree (pure).

A replica's TP ranks are the processes of ONE pod on ONE node (`--tp-size TP`, `nvidia.com/gpu: TP`),
so the node's sidecar holds every shard of the replica's stripes by construction and TP collectives
use NVLink/P2P inside the pod. The sidecar group of replica g is `<namespace>/<name>-r<g>`; rank i of
the pod runs on the i-th GPU the device plugin lists in NVIDIA_VISIBLE_DEVICES. TP across nodes is
refused (CRD rule on engine.args, `specs.validate`): a stripe never spans two sidecars.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from ghostserve.operator import specchecks, specs

REPLICA_LABEL = "ghostserve.io/replica"
COMPONENT_LABEL = "app.kubernetes.io/component"
ENGINE_COMPONENT = "engine"
# Hash of the spec fields a sidecar group's settings depend on; a change resets the group (KV recomputed).
GROUP_HASH_ANNOTATION = "ghostserve.io/group-hash"
GPU_RESOURCE = "nvidia.com/gpu"
_DEFAULT_ACCESS = specs.NodeAccess()


def replica_pod_name(name: str, replica: int) -> str:
    return f"{name}-r{replica}"


sidecar_group_id = specs.sidecar_group_id


def replica_labels(name: str, replica: int) -> dict[str, str]:
    return {
        specs.APP_LABEL: specs.APP_VALUE,
        specs.DEPLOYMENT_LABEL: name,
        REPLICA_LABEL: str(replica),
        COMPONENT_LABEL: ENGINE_COMPONENT,
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def spec_hash(spec: Mapping[str, Any]) -> str:
    """Hash of the fields that shape a replica pod (not `replicas`: scaling must not roll every pod)."""
    engine = {k: v for k, v in spec["engine"].items() if k != "replicas"}
    shaping = {"model": spec.get("model"), "engine": engine, "protection": spec["protection"]}
    return _digest({**shaping, "sidecar": spec.get("sidecar")})


def group_hash(spec: Mapping[str, Any]) -> str:
    """Hash of what the sidecar group's settings follow: world size, KV layout (model, page size, engine
    args such as the KV dtype) and the code. A change needs a new group: the sidecar refuses an Attach
    whose settings differ from the group's (ALREADY_EXISTS)."""
    prot = spec["protection"]
    coding = ("enabled", "code", "parityShards", "chunkTokens", "pageSize")
    return _digest(
        {
            "model": spec.get("model"),
            "tp": spec["engine"]["tensorParallel"],
            "args": spec["engine"].get("args") or [],
            "protection": {k: prot[k] for k in coding},
        }
    )


def engine_args(spec: Mapping[str, Any]) -> list[str]:
    """sglang-style arguments of a replica: the whole TP group in one process tree on one node."""
    model, engine, prot = spec["model"], spec["engine"], spec["protection"]
    args = [
        "--model-path",
        model.get("path") or model["name"],
        "--tp-size",
        str(engine["tensorParallel"]),
        "--host",
        "0.0.0.0",
        "--port",
        str(specs.ENGINE_PORT),
        "--page-size",
        str(prot["pageSize"]),
    ]
    return args + list(engine["args"])


def engine_env(namespace: str, name: str, spec: Mapping[str, Any], replica: int) -> list[dict[str, Any]]:
    # The plugin reads its settings from the environment, not sglang's argv: sglang spawns its
    # scheduler processes (which inherit the environment) and rejects command-line flags it does not know.
    # No per-rank variable: one process tree holds every rank of the replica.
    prot = spec["protection"]
    field = {"fieldRef": {"fieldPath": "metadata.name"}}
    ours: list[dict[str, Any]] = [
        {"name": "SGLANG_PLUGINS", "value": "ghostserve"},
        {"name": "GHOSTSERVE_SGLANG", "value": "1" if prot["enabled"] else "0"},
        {"name": "GHOSTSERVE_SIDECAR", "value": specs.SIDECAR_SOCKET_IN_POD},
        {"name": "GHOSTSERVE_CODE", "value": prot["code"]},
        {"name": "GHOSTSERVE_PARITY_SHARDS", "value": str(prot["parityShards"])},
        {"name": "GHOSTSERVE_CHUNK_TOKENS", "value": str(prot["chunkTokens"])},
        {"name": "GHOSTSERVE_GROUP", "value": sidecar_group_id(namespace, name, replica)},
        {"name": "GHOSTSERVE_WORLD_SIZE", "value": str(spec["engine"]["tensorParallel"])},
        {"name": "GHOSTSERVE_PARITY_BUDGET", "value": str(specchecks.parity_budget_bytes(spec))},
        {"name": "GHOSTSERVE_WORKER_ID", "valueFrom": field},
        {"name": "GHOSTSERVE_POD_NAME", "valueFrom": field},
        {"name": "GHOSTSERVE_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    taken = {e["name"] for e in ours}
    return [e for e in spec["engine"]["env"] if e.get("name") not in taken] + ours


def node_affinity(*, pin_node: str | None, avoid_nodes: Iterable[str]) -> dict[str, Any]:
    """Required node affinity: `In [pin_node]` (the operator chose the node: same-node GPU swap, or the
    node the KV was moved to) and/or `NotIn avoid_nodes` (nodes that failed or could not take the pod)."""
    terms: list[dict[str, Any]] = []
    avoid = sorted(set(avoid_nodes) - {pin_node or ""})
    if avoid:
        terms.append({"key": "kubernetes.io/hostname", "operator": "NotIn", "values": avoid})
    if pin_node:
        terms.append({"key": "kubernetes.io/hostname", "operator": "In", "values": [pin_node]})
    if not terms:
        return {}
    required = {"nodeSelectorTerms": [{"matchExpressions": terms}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}


def _socket_dir(spec: Mapping[str, Any], access: specs.NodeAccess) -> str:
    # The chart's operator flag when the operator has it (never a CR's choice), else the older spec field.
    found = getattr(access, "socket_dir", None) or (spec.get("sidecar") or {}).get("socketDir")
    return str(found or "/run/ghostserve")


def build_replica_pod(
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    replica: int,
    *,
    pin_node: str | None = None,
    avoid_nodes: Iterable[str] = (),
    node_access: specs.NodeAccess = _DEFAULT_ACCESS,
) -> dict[str, Any]:
    """The manifest of one replica pod (owner references are added by the caller via kopf.adopt).

    The failed GPU of a device fault is kept out by the device plugin (it reports the GPU unhealthy),
    not by anything in this manifest."""
    engine = spec["engine"]
    tp = str(engine["tensorParallel"])
    resources = copy.deepcopy(engine.get("resources") or {})
    resources.setdefault("limits", {})[GPU_RESOURCE] = tp
    resources.setdefault("requests", {})[GPU_RESOURCE] = tp
    # sglang's /health runs a one-token generation (its own deadline: 20 s), which takes more than the
    # default 1 s on a busy engine or a CPU; a probe that times out would keep the replica unready.
    health = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 20}
    container: dict[str, Any] = {
        "name": "engine",
        "image": engine["image"],
        "args": engine_args(spec),
        "env": engine_env(namespace, name, spec, replica),
        "ports": [{"name": "http", "containerPort": specs.ENGINE_PORT}],
        "resources": resources,
        "volumeMounts": [{"name": "ghostserve-sidecar", "mountPath": specs.SIDECAR_MOUNT_PATH}],
        # Loading weights takes minutes: the startup probe gives it 30 min before liveness rules apply.
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator restarts replicas: every restart is a recorded recovery
        "nodeSelector": dict(engine.get("nodeSelector") or {}),
        "tolerations": list(engine.get("tolerations") or []),
        "containers": [container],
        "volumes": [
            {
                "name": "ghostserve-sidecar",
                "hostPath": {"path": _socket_dir(spec, node_access), "type": "Directory"},
            }
        ],
    }
    if node_access.socket_group is not None:
        pod_spec["securityContext"] = {"supplementalGroups": [node_access.socket_group]}
    if node_access.shm_dir:
        container["volumeMounts"].append({"name": "ghostserve-pools", "mountPath": "/dev/shm"})
        pod_spec["volumes"].append(
            {"name": "ghostserve-pools", "hostPath": {"path": node_access.shm_dir, "type": "Directory"}}
        )
    affinity = node_affinity(pin_node=pin_node, avoid_nodes=avoid_nodes)
    if affinity:
        pod_spec["affinity"] = affinity
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": replica_pod_name(name, replica),
            "namespace": namespace,
            "labels": replica_labels(name, replica),
            "annotations": {
                specs.SPEC_HASH_ANNOTATION: spec_hash(spec),
                GROUP_HASH_ANNOTATION: group_hash(spec),
            },
        },
        "spec": pod_spec,
    }


GATEWAY_PREFER_SAME_S = 180


def gateway_pod_name(name: str) -> str:
    return f"{name}-gateway"


def build_gateway_pod(namespace: str, name: str, image: str) -> dict[str, Any]:
    """The deployment's resume gateway (`ghostserve gateway`, docs/gateway.md): finds the ready replica
    pods by label, fronts them, and keeps client streams alive across a replica's recovery by
    resubmitting in-flight requests with their tokens so far. The client Service selects it."""
    selector = f"{specs.DEPLOYMENT_LABEL}={name},{COMPONENT_LABEL}={ENGINE_COMPONENT}"
    health = {"httpGet": {"path": "/health", "port": "http"}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": gateway_pod_name(name),
            "namespace": namespace,
            "labels": {
                specs.APP_LABEL: specs.APP_VALUE,
                specs.DEPLOYMENT_LABEL: name,
                COMPONENT_LABEL: specs.GATEWAY_COMPONENT,
            },
        },
        "spec": {
            "restartPolicy": "Always",  # stateless: kubelet restarts it in place
            # Its own account (gatewayaccess): pods list in this namespace, not the default account.
            "serviceAccountName": gateway_pod_name(name),
            "containers": [
                {
                    "name": "gateway",
                    "image": image,
                    "args": [
                        "gateway",
                        "--listen",
                        f"0.0.0.0:{specs.GATEWAY_PORT}",
                        "--selector",
                        selector,
                        "--namespace",
                        namespace,
                        "--backend-port",
                        str(specs.ENGINE_PORT),
                        # A replica recovering from a GPU fault comes back under the same pod name
                        # with its KV restored: waiting for it beats recomputing on another replica.
                        "--prefer-same-for",
                        str(GATEWAY_PREFER_SAME_S),
                    ],
                    "ports": [{"name": "http", "containerPort": specs.GATEWAY_PORT}],
                    "readinessProbe": {**health, "periodSeconds": 5},
                    "securityContext": {
                        "runAsNonRoot": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def gpu_request(pod: Mapping[str, Any]) -> int:
    """nvidia.com/gpu the pod's containers hold (limits, as the device plugin allocates)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(GPU_RESOURCE)
        try:
            total += int(str(value or 0))
        except ValueError:
            continue
    return total


def replica_of(pod: Mapping[str, Any]) -> tuple[tuple[str, str], int] | None:
    """((namespace, deployment), replica) of a replica pod; None for any other pod."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        return (str(meta["namespace"]), str(labels[specs.DEPLOYMENT_LABEL])), int(labels[REPLICA_LABEL])
    except (KeyError, ValueError):
        return None


def uid_of(pod: Mapping[str, Any] | None) -> str | None:
    return ((pod or {}).get("metadata") or {}).get("uid")
