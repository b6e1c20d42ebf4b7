"""GhostServeDeployment spec: defaults, validation and the rank pod / Service manifests.

Pure functions over plain dicts: no kopf, no I/O. The CRD in the chart rejects most bad specs
server-side; `validate` repeats the checks because an API server without the schema (or an
older CRD) must not make the operator build broken pods.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

GROUP = "ghostserve.io"
VERSION = "v1alpha1"
PLURAL = "ghostservedeployments"
KIND = "GhostServeDeployment"

APP_LABEL = "app.kubernetes.io/name"
APP_VALUE = "ghostserve"
DEPLOYMENT_LABEL = "ghostserve.io/deployment"
GROUP_LABEL = "ghostserve.io/group"
RANK_LABEL = "ghostserve.io/rank"
SPEC_HASH_ANNOTATION = "ghostserve.io/spec-hash"
# Set on a rank pod by the engine (or device plugin glue) to the GPU it runs on: a UUID or an index.
GPU_ANNOTATION = "ghostserve.io/gpu"
# Written by the operator on a replacement pod: GPUs the replacement must not be given.
AVOID_GPUS_ANNOTATION = "ghostserve.io/avoid-gpus"

SIDECAR_SOCKET_IN_POD = "unix:///run/ghostserve/sidecar.sock"
SIDECAR_MOUNT_PATH = "/run/ghostserve"
ENGINE_PORT = 30000
DIST_PORT = 5000

CODES = ("none", "replicate", "xor", "rdp", "rs")
RECOMPUTE = ("hybrid", "always-recompute", "rebuild-only")
FAULT_POLICIES = ("rank", "group")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

DEFAULTS: dict[str, Any] = {
    "engine": {
        "kind": "sglang",
        "args": [],
        "replicas": 1,
        "gpusPerRank": 1,
        "resources": {},
        "env": [],
        "nodeSelector": {},
        "tolerations": [],
    },
    "protection": {
        "enabled": True,
        "code": "xor",
        "parityShards": 1,
        "chunkTokens": 256,
        "pageSize": 16,
        "hostMemoryBudget": "64Gi",
        "recompute": "hybrid",
    },
    "recovery": {"faultPolicy": "rank", "maxRecoveriesPerHour": 6, "backoffSeconds": 10},
    "sidecar": {"socketDir": "/run/ghostserve", "port": 7443},
}


class SpecError(ValueError):
    """The spec can never produce a working deployment; `errors` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def with_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `spec` with the CRD's defaults filled in (the input is not mutated)."""
    out = copy.deepcopy(dict(spec))
    for section, defaults in DEFAULTS.items():
        merged = copy.deepcopy(defaults)
        merged.update(out.get(section) or {})
        out[section] = merged
    return out


def _int_in(errors: list[str], where: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        errors.append(f"{where} must be an integer in [{low}, {high}], got {value!r}")


def validate(name: str, spec: Mapping[str, Any]) -> list[str]:
    """Every problem of a (defaulted) spec as a readable message; empty when the spec is usable."""
    errors: list[str] = []
    model, engine = spec.get("model") or {}, spec["engine"]
    prot, rec, side = spec["protection"], spec["recovery"], spec["sidecar"]
    if not model.get("name"):
        errors.append("model.name is required")
    if not engine.get("image"):
        errors.append("engine.image is required")
    if engine.get("kind") != "sglang":
        errors.append(f"engine.kind must be 'sglang', got {engine.get('kind')!r}")
    _int_in(errors, "engine.tensorParallel", engine.get("tensorParallel"), 1, 64)
    _int_in(errors, "engine.replicas", engine.get("replicas"), 1, 64)
    _int_in(errors, "engine.gpusPerRank", engine.get("gpusPerRank"), 1, 8)
    if not isinstance(engine.get("args"), list) or not all(isinstance(a, str) for a in engine["args"]):
        errors.append("engine.args must be a list of strings")
    code = prot.get("code")
    if code not in CODES:
        errors.append(f"protection.code must be one of {', '.join(CODES)}, got {code!r}")
    _int_in(errors, "protection.parityShards", prot.get("parityShards"), 1, 8)
    m = prot.get("parityShards")
    if code == "xor" and m != 1:
        errors.append(f"protection.parityShards must be 1 for xor, got {m!r}")
    if code == "rdp" and m != 2:
        errors.append(f"protection.parityShards must be 2 for rdp, got {m!r}")
    _int_in(errors, "protection.pageSize", prot.get("pageSize"), 1, 4096)
    _int_in(errors, "protection.chunkTokens", prot.get("chunkTokens"), 16, 65536)
    page, chunk = prot.get("pageSize"), prot.get("chunkTokens")
    if isinstance(page, int) and isinstance(chunk, int) and page > 0 and chunk % page:
        errors.append(f"protection.chunkTokens ({chunk}) must be a multiple of pageSize ({page})")
    if not isinstance(prot.get("hostMemoryBudget"), str) or not _QUANTITY.match(prot["hostMemoryBudget"]):
        errors.append(f"protection.hostMemoryBudget is not a quantity: {prot.get('hostMemoryBudget')!r}")
    if prot.get("recompute") not in RECOMPUTE:
        errors.append(f"protection.recompute must be one of {', '.join(RECOMPUTE)}")
    if rec.get("faultPolicy") not in FAULT_POLICIES:
        errors.append(f"recovery.faultPolicy must be rank or group, got {rec.get('faultPolicy')!r}")
    _int_in(errors, "recovery.maxRecoveriesPerHour", rec.get("maxRecoveriesPerHour"), 0, 1000)
    _int_in(errors, "recovery.backoffSeconds", rec.get("backoffSeconds"), 0, 3600)
    _int_in(errors, "sidecar.port", side.get("port"), 1, 65535)
    if not str(side.get("socketDir", "")).startswith("/"):
        errors.append("sidecar.socketDir must be an absolute path")
    if not _DNS_LABEL.match(name) or len(rank_pod_name(name, 63, 63)) > 63:
        errors.append(f"name {name!r} must be a DNS label short enough for '<name>-g63-r63' (63 chars)")
    return errors


def checked(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The defaulted spec; raises SpecError listing every problem when it is unusable."""
    full = with_defaults(spec)
    errors = validate(name, full)
    if errors:
        raise SpecError(errors)
    return full


def rank_pod_name(name: str, group: int, rank: int) -> str:
    return f"{name}-g{group}-r{rank}"


def sidecar_group_id(namespace: str, name: str, group: int) -> str:
    """The group id the sidecar knows a replica group by (shared with the engine)."""
    return f"{namespace}/{name}-g{group}"


def rank_labels(name: str, group: int, rank: int) -> dict[str, str]:
    return {APP_LABEL: APP_VALUE, DEPLOYMENT_LABEL: name, GROUP_LABEL: str(group), RANK_LABEL: str(rank)}


def spec_hash(spec: Mapping[str, Any]) -> str:
    """Hash of the fields that shape a rank pod: a change means the pods must be rolled."""
    shaping = {
        "model": spec.get("model"),
        "engine": spec["engine"],
        "protection": spec["protection"],
        "sidecar": spec["sidecar"],
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def engine_args(name: str, spec: Mapping[str, Any], group: int, rank: int) -> list[str]:
    """SGLang arguments of one rank: model, multi-node TP wiring, GhostServe protection flags."""
    model, engine, prot = spec["model"], spec["engine"], spec["protection"]
    tp = engine["tensorParallel"]
    args = [
        "--model-path",
        model.get("path") or model["name"],
        "--tp-size",
        str(tp),
        "--nnodes",
        str(tp),
        "--node-rank",
        str(rank),
        "--dist-init-addr",
        f"{rank_pod_name(name, group, 0)}.{name}:{DIST_PORT}",
        "--host",
        "0.0.0.0",
        "--port",
        str(ENGINE_PORT),
        "--page-size",
        str(prot["pageSize"]),
    ]
    return args + list(engine["args"])


def _engine_env(namespace: str, name: str, spec: Mapping[str, Any], group: int, rank: int) -> list[Any]:
    # The plugin reads its settings from the environment, not sglang's argv: sglang spawns its
    # scheduler processes (which inherit the environment) and rejects command-line flags it does not know.
    prot = spec["protection"]
    ours: list[dict[str, Any]] = [
        {"name": "SGLANG_PLUGINS", "value": "ghostserve"},
        {"name": "GHOSTSERVE_SGLANG", "value": "1" if prot["enabled"] else "0"},
        {"name": "GHOSTSERVE_SIDECAR", "value": SIDECAR_SOCKET_IN_POD},
        {"name": "GHOSTSERVE_CODE", "value": prot["code"]},
        {"name": "GHOSTSERVE_PARITY_SHARDS", "value": str(prot["parityShards"])},
        {"name": "GHOSTSERVE_CHUNK_TOKENS", "value": str(prot["chunkTokens"])},
        {"name": "GHOSTSERVE_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "GHOSTSERVE_GROUP", "value": sidecar_group_id(namespace, name, group)},
        {"name": "GHOSTSERVE_RANK", "value": str(rank)},
        {"name": "GHOSTSERVE_WORLD_SIZE", "value": str(spec["engine"]["tensorParallel"])},
        {"name": "GHOSTSERVE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "GHOSTSERVE_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    taken = {e["name"] for e in ours}
    return [e for e in spec["engine"]["env"] if e.get("name") not in taken] + ours


def _affinity(*, avoid_nodes: Iterable[str], pin_node: str | None, prefer_node: str | None) -> dict[str, Any]:
    terms: list[dict[str, Any]] = []
    avoid = sorted(set(avoid_nodes) - {pin_node})
    if avoid:
        terms.append({"key": "kubernetes.io/hostname", "operator": "NotIn", "values": avoid})
    if pin_node:
        terms.append({"key": "kubernetes.io/hostname", "operator": "In", "values": [pin_node]})
    node_affinity: dict[str, Any] = {}
    if terms:
        node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": terms}]
        }
    if prefer_node and not pin_node:
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {
                "weight": 100,
                "preference": {
                    "matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In", "values": [prefer_node]}
                    ]
                },
            }
        ]
    return {"nodeAffinity": node_affinity} if node_affinity else {}


@dataclasses.dataclass(frozen=True)
class NodeAccess:
    """How rank pods reach the node's sidecar beyond its socket (chart values, passed as operator flags).

    socket_group: the socket directory's group (sidecar.socketGroup); non-root engines need it as a
    supplemental group to open the socket. shm_dir: the host directory the sidecar's CPU KV pools live in
    (sidecar.shmDir), mounted at /dev/shm so rank processes can map the pools; None when pools are on GPUs."""

    socket_group: int | None = 2000
    shm_dir: str | None = "/dev/shm/ghostserve"


def build_rank_pod(
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    *,
    group: int,
    rank: int,
    avoid_nodes: Iterable[str] = (),
    avoid_gpus: Iterable[str] = (),
    pin_node: str | None = None,
    prefer_node: str | None = None,
    node_access: NodeAccess = NodeAccess(),
) -> dict[str, Any]:
    """The manifest of one rank pod (owner references are added by the caller via kopf.adopt).

    `avoid_nodes` become a required NotIn node affinity (node faults), `pin_node` a required In
    (restart in place after a process fault), `prefer_node` a preferred In (device fault: same node,
    another GPU, listed in the avoid-gpus annotation for the device plugin glue)."""
    engine = spec["engine"]
    resources = copy.deepcopy(engine.get("resources") or {})
    gpus = str(engine["gpusPerRank"])
    resources.setdefault("limits", {})["nvidia.com/gpu"] = gpus
    resources.setdefault("requests", {})["nvidia.com/gpu"] = gpus
    annotations = {SPEC_HASH_ANNOTATION: spec_hash(spec)}
    bad_gpus = sorted(set(avoid_gpus))
    if bad_gpus:
        annotations[AVOID_GPUS_ANNOTATION] = ",".join(bad_gpus)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator restarts ranks: every restart is a recorded recovery
        "hostname": rank_pod_name(name, group, rank),
        "subdomain": name,
        "nodeSelector": dict(engine.get("nodeSelector") or {}),
        "tolerations": list(engine.get("tolerations") or []),
        "containers": [
            {
                "name": "engine",
                "image": engine["image"],
                "args": engine_args(name, spec, group, rank),
                "env": _engine_env(namespace, name, spec, group, rank),
                "ports": [
                    {"name": "http", "containerPort": ENGINE_PORT},
                    {"name": "dist", "containerPort": DIST_PORT},
                ],
                "resources": resources,
                "volumeMounts": [{"name": "ghostserve-sidecar", "mountPath": SIDECAR_MOUNT_PATH}],
            }
        ],
        "volumes": [
            {
                "name": "ghostserve-sidecar",
                "hostPath": {"path": spec["sidecar"]["socketDir"], "type": "Directory"},
            }
        ],
    }
    if node_access.socket_group is not None:
        pod_spec["securityContext"] = {"supplementalGroups": [node_access.socket_group]}
    if node_access.shm_dir:
        pod_spec["containers"][0]["volumeMounts"].append(
            {"name": "ghostserve-pools", "mountPath": "/dev/shm"}
        )
        pod_spec["volumes"].append(
            {"name": "ghostserve-pools", "hostPath": {"path": node_access.shm_dir, "type": "Directory"}}
        )
    affinity = _affinity(avoid_nodes=avoid_nodes, pin_node=pin_node, prefer_node=prefer_node)
    if affinity:
        pod_spec["affinity"] = affinity
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": rank_pod_name(name, group, rank),
            "namespace": namespace,
            "labels": rank_labels(name, group, rank),
            "annotations": annotations,
        },
        "spec": pod_spec,
    }


def build_service(namespace: str, name: str) -> dict[str, Any]:
    """Headless Service giving every rank pod a stable DNS name `<pod>.<name>` (rank discovery)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {APP_LABEL: APP_VALUE, DEPLOYMENT_LABEL: name},
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # ranks must find rank 0 before they are ready
            "selector": {APP_LABEL: APP_VALUE, DEPLOYMENT_LABEL: name},
            "ports": [{"name": "http", "port": ENGINE_PORT}, {"name": "dist", "port": DIST_PORT}],
        },
    }


def desired_ranks(spec: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(group, rank) of every pod the spec asks for, in order."""
    engine = spec["engine"]
    return [(g, r) for g in range(engine["replicas"]) for r in range(engine["tensorParallel"])]
