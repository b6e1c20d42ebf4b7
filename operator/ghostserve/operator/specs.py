"""GhostServeDeployment spec: defaults, validation, names and the client Service manifest.

Pure functions over plain dicts: no kopf, no I/O. The CRD in the chart rejects most bad specs
server-side; `validate` repeats the checks because an API server without the schema (or an
older CRD) must not make the operator build broken pods.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ghostserve.kernels import protection
from ghostserve.operator import specchecks

GROUP = "ghostserve.io"
VERSION = "v1alpha1"
PLURAL = "ghostservedeployments"
KIND = "GhostServeDeployment"

APP_LABEL = "app.kubernetes.io/name"
APP_VALUE = "ghostserve"
DEPLOYMENT_LABEL = "ghostserve.io/deployment"
SPEC_HASH_ANNOTATION = "ghostserve.io/spec-hash"

SIDECAR_SOCKET_IN_POD = "unix:///run/ghostserve/sidecar.sock"
SIDECAR_MOUNT_PATH = "/run/ghostserve"
ENGINE_PORT = 30000
# Engine flags that spread one TP group over several nodes: refused, a stripe must stay in one sidecar.
MULTI_NODE_FLAGS = ("--nnodes", "--node-rank", "--dist-init-addr", "--nccl-init-addr")

CODES = protection.CODES  # defined once: ghostserve.kernels.protection
RECOMPUTE = ("hybrid", "always-recompute", "rebuild-only")
FAULT_POLICIES = ("rank", "group")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

DEFAULTS: dict[str, Any] = {
    "engine": {
        "kind": "sglang",
        "args": [],
        "replicas": 1,
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
    if not isinstance(engine.get("args"), list) or not all(isinstance(a, str) for a in engine["args"]):
        errors.append("engine.args must be a list of strings")
    elif any(a.split("=", 1)[0] in MULTI_NODE_FLAGS for a in engine["args"]):
        errors.append(
            "engine.args: tensor parallelism across nodes (--nnodes/--node-rank/--dist-init-addr) is not "
            "supported: a replica's ranks run in one pod on one node so one sidecar holds every stripe"
        )
    code = prot.get("code")
    if code not in CODES:
        errors.append(f"protection.code must be one of {', '.join(CODES)}, got {code!r}")
    _int_in(errors, "protection.parityShards", prot.get("parityShards"), 1, protection.MAX_RS_PARITY)
    m = prot.get("parityShards")
    fixed = protection.FIXED_PARITY.get(code) if code in protection.ERASURE_CODES else None
    if fixed is not None and m != fixed:
        errors.append(f"protection.parityShards must be {fixed} for {code}, got {m!r}")
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
    if not _DNS_LABEL.match(name) or len(f"{name}-gateway") > 63:
        errors.append(f"name {name!r} must be a DNS label short enough for '<name>-gateway' (63 chars)")
    errors.extend(specchecks.problems(name, spec))  # types, caps, quantities, env, tolerations, paths
    return errors


def checked(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The defaulted spec; raises SpecError listing every problem when it is unusable."""
    shape = specchecks.shape_problems(spec)  # with_defaults needs mappings; report, do not raise TypeError
    if shape:
        raise SpecError(shape)
    full = with_defaults(spec)
    errors = validate(name, full) + specchecks.removed_fields(spec)
    if errors:
        raise SpecError(errors)
    return full


def sidecar_group_id(namespace: str, name: str, replica: int) -> str:
    """The group id the node's sidecar knows replica `replica` by (the engine reads GHOSTSERVE_GROUP)."""
    return f"{namespace}/{name}-r{replica}"


@dataclasses.dataclass(frozen=True)
class NodeAccess:
    """How rank pods reach the node's sidecar beyond its socket (chart values, passed as operator flags).

    socket_group: the socket directory's group (sidecar.socketGroup); non-root engines need it as a
    supplemental group to open the socket. shm_dir: the host directory the sidecar's CPU KV pools live in
    (sidecar.shmDir), mounted at /dev/shm so rank processes can map the pools; None when pools are on GPUs."""

    socket_group: int | None = 2000
    shm_dir: str | None = "/dev/shm/ghostserve"


GATEWAY_PORT = 8000
GATEWAY_COMPONENT = "gateway"


def build_service(namespace: str, name: str) -> dict[str, Any]:
    """The client Service `<name>`: the deployment's resume gateway, which fronts the replica pods and
    keeps client streams alive across a replica's recovery (docs/gateway.md)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {APP_LABEL: APP_VALUE, DEPLOYMENT_LABEL: name},
        },
        "spec": {
            "selector": {
                APP_LABEL: APP_VALUE,
                DEPLOYMENT_LABEL: name,
                "app.kubernetes.io/component": GATEWAY_COMPONENT,
            },
            "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http"}],
        },
    }
