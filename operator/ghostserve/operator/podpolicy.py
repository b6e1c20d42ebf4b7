"""What every pod the operator creates may and must contain, whatever the GhostServeDeployment says (pure).

Creating a GhostServeDeployment must never grant more than creating an ordinary pod would, apart from
the node's sidecar: the two hostPath volumes (the sidecar's socket directory and its shared-memory pool
directory) take their paths from the chart (operator flags), never from the CR, and no other host
access (host paths, host namespaces, privileged containers, added capabilities) can get into a pod.
Rank pods run as a non-root user unless the chart allows root (`rankPods.allowRoot`). Applied by
`kube.Kube.create_pod`, the one place pods are created, so no builder can bypass it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

SOCKET_VOLUME = "ghostserve-sidecar"
POOLS_VOLUME = "ghostserve-pools"


class PolicyError(ValueError):
    """The pod asks for host access the policy does not allow; it is not created."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """socket_dir / shm_dir: host directories of the sidecar socket and pools (chart sidecar.socketDir,
    sidecar.shmDir); run_as_user: UID of non-root pods that set none; allow_root: let pods run as the
    image's user, root included (chart rankPods.allowRoot)."""

    socket_dir: str = "/run/ghostserve"
    shm_dir: str | None = "/dev/shm/ghostserve"
    run_as_user: int = 65532
    allow_root: bool = False


_HOST_NAMESPACES = ("hostNetwork", "hostPID", "hostIPC")


def _volumes(pod_spec: dict[str, Any], policy: Policy) -> None:
    for volume in pod_spec.get("volumes") or []:
        if "hostPath" not in volume:
            continue
        name = volume.get("name")
        if name == SOCKET_VOLUME:
            volume["hostPath"] = {"path": policy.socket_dir, "type": "Directory"}
        elif name == POOLS_VOLUME and policy.shm_dir:
            volume["hostPath"] = {"path": policy.shm_dir, "type": "Directory"}
        else:
            raise PolicyError(f"hostPath volume {name!r} is not allowed (only the sidecar socket and pools)")


def _pod_security(pod_spec: dict[str, Any], policy: Policy) -> None:
    for key in _HOST_NAMESPACES:
        if pod_spec.get(key):
            raise PolicyError(f"spec.{key} is not allowed")
    ctx = pod_spec.setdefault("securityContext", {})
    ctx.setdefault("seccompProfile", {"type": "RuntimeDefault"})
    if policy.allow_root:
        return
    if ctx.get("runAsUser") == 0 or ctx.get("runAsNonRoot") is False:
        raise PolicyError("rank pods must not run as root (the chart's rankPods.allowRoot permits it)")
    ctx["runAsNonRoot"] = True
    ctx.setdefault("runAsUser", policy.run_as_user)
    ctx.setdefault("runAsGroup", policy.run_as_user)


def _container_security(container: dict[str, Any], policy: Policy) -> None:
    ctx = container.setdefault("securityContext", {})
    where = f"container {container.get('name')!r}"
    if ctx.get("privileged"):
        raise PolicyError(f"{where}: privileged is not allowed")
    if (ctx.get("capabilities") or {}).get("add"):
        raise PolicyError(f"{where}: added capabilities are not allowed")
    if not policy.allow_root and (ctx.get("runAsUser") == 0 or ctx.get("runAsNonRoot") is False):
        raise PolicyError(f"{where} must not run as root (the chart's rankPods.allowRoot permits it)")
    ctx["allowPrivilegeEscalation"] = False
    ctx["capabilities"] = {"drop": ["ALL"]}
    ctx.setdefault("seccompProfile", {"type": "RuntimeDefault"})


def enforce(pod: Mapping[str, Any], policy: Policy) -> dict[str, Any]:
    """A copy of `pod` with the host paths set from the policy and the security settings filled in;
    raises PolicyError when the pod asks for anything the policy forbids."""
    out = copy.deepcopy(dict(pod))
    pod_spec = out.setdefault("spec", {})
    _volumes(pod_spec, policy)
    _pod_security(pod_spec, policy)
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod_spec.get(key) or []:
            _container_security(container, policy)
    return out
