"""What a pod's container becomes on a simulated node: argv, environment, working paths (pure).

The node agent has no container runtime, so it runs the container as a local process tree:

- the image selects a local command (`ImageTable`): the reference engine's serving entry point, sglang's
  launch_server from .venv-sglang, the `ghostserve` CLI (the operator/gateway image), or a local python;
- env: the pod's env (values, fieldRefs), the device plugin's GPU variables, KUBECONFIG for in-cluster
  clients (there is no service-account token to mount);
- volumes: a value or argument under a hostPath volume's mountPath is rewritten to that host path under
  the node's root directory (the stand-in's mount namespace); /dev/shm is left alone: pool segment
  names carry the node's prefix;
- network: `--host 0.0.0.0` becomes the pod's own loopback IP (the stand-in's network namespace).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[3]
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")


class ContainerError(ValueError):
    """The container cannot run here (unknown image, unsupported field); `reason` is kubelet's word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _python_module(module: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", module]


def _is_launch_server(command: Sequence[str]) -> bool:
    return len(command) >= 3 and command[1] == "-m" and command[2] == "sglang.launch_server"


@dataclasses.dataclass(frozen=True)
class ImageTable:
    """Image name -> how to run it locally. Matching is by substring of the image reference, first wins."""

    reference: tuple[str, ...] = ("reference",)
    sglang: tuple[str, ...] = ("sglang",)
    ghostserve: tuple[str, ...] = ("ghostserve/ghostserve", "ghostserve:")
    python: tuple[str, ...] = ("python",)
    sglang_python: pathlib.Path = SGLANG_PYTHON

    def argv(self, image: str, command: Sequence[str], args: Sequence[str]) -> list[str]:
        """The local argv of a container. Raises ContainerError (ErrImagePull) for an unknown image."""
        command, args = list(command), list(args)
        if any(k in image for k in self.reference):
            if command and not _is_launch_server(command):
                raise ContainerError("CreateContainerError", f"{image} runs the reference server only")
            return [*_python_module("ghostserve.engine.reference.serve"), *args]
        if any(k in image for k in self.sglang):
            if command and not _is_launch_server(command):
                raise ContainerError("CreateContainerError", f"{image}: only sglang.launch_server runs here")
            if not self.sglang_python.exists():
                raise ContainerError(
                    "ErrImagePull", f"{image} needs {self.sglang_python} (scripts/setup-sglang.sh)"
                )
            return [*_python_module("sglang.launch_server", str(self.sglang_python)), *args]
        if any(k in image for k in self.ghostserve):
            rest = command[1:] if command and command[0] == "ghostserve" else command
            return [*_python_module("ghostserve.cli.main"), *rest, *args]
        if any(k in image for k in self.python) and command and command[0] in {"python", "python3"}:
            return [sys.executable, *command[1:], *args]
        raise ContainerError("ErrImagePull", f"image {image!r} is not in the embedded cluster's image table")


@dataclasses.dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]


def _field(pod: Mapping[str, Any], path: str) -> str:
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    fields = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path.startswith("metadata.labels['") or path.startswith("metadata.annotations['"):
        which, key = path.split("['", 1)
        return str(((meta.get(which.split(".")[1]) or {}).get(key.rstrip("']"))) or "")
    if path not in fields:
        raise ContainerError("CreateContainerConfigError", f"fieldRef {path!r} is not supported here")
    return str(fields[path] or "")


def host_paths(
    pod: Mapping[str, Any], container: Mapping[str, Any], node_root: pathlib.Path
) -> dict[str, pathlib.Path]:
    """mountPath -> host directory (under the node root) of every hostPath volume mounted, but /dev/shm."""
    volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
    out = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount.get("name"))
        if volume is None:
            raise ContainerError(
                "CreateContainerConfigError", f"volumeMount {mount.get('name')!r} has no volume"
            )
        if "hostPath" not in volume:
            continue  # emptyDir/configMap/...: nothing the node agent maps (documented in docs/cluster.md)
        if mount["mountPath"] == "/dev/shm":
            continue
        out[mount["mountPath"].rstrip("/") or "/"] = node_root / volume["hostPath"]["path"].lstrip("/")
    return out


def _rewrite(value: str, mounts: Mapping[str, pathlib.Path]) -> str:
    for mount, host in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        for prefix in ("unix://", "unix:", "file://", ""):
            whole = prefix + mount
            if value == whole or value.startswith(whole + "/"):
                return prefix + str(host) + value[len(whole) :]
    return value


def _with_pod_ip(args: list[str], pod_ip: str) -> list[str]:
    """Binding every interface inside a pod binds the pod's IP: `0.0.0.0` (alone, as `0.0.0.0:PORT`
    or after `--flag=`) becomes the pod IP."""
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if value == "0.0.0.0" or value.startswith("0.0.0.0:"):
            value = pod_ip + value[len("0.0.0.0") :]
        out.append(f"{flag}{eq}{value}")
    return out


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; unknown references stay."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def launch(
    pod: Mapping[str, Any],
    *,
    images: ImageTable,
    node_root: pathlib.Path,
    device_env: Mapping[str, str],
    kubeconfig: pathlib.Path,
) -> Launch:
    """argv and environment of the pod's (only) container. Raises ContainerError."""
    containers = (pod.get("spec") or {}).get("containers") or []
    if len(containers) != 1:
        raise ContainerError(
            "CreateContainerConfigError", "the embedded node agent runs one container per pod"
        )
    container = containers[0]
    pod_ip = (pod.get("status") or {}).get("podIP") or ""
    mounts = host_paths(pod, container, node_root)
    env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
    env.update(HOSTNAME=pod["metadata"]["name"], PYTHONUNBUFFERED="1", KUBECONFIG=str(kubeconfig))
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
        elif "fieldRef" in (item.get("valueFrom") or {}):
            env[item["name"]] = _field(pod, item["valueFrom"]["fieldRef"]["fieldPath"])
        else:
            raise ContainerError(
                "CreateContainerConfigError", f"env {item.get('name')}: only values and fieldRefs"
            )
    env = {k: _rewrite(v, mounts) for k, v in env.items()}
    env.update(device_env)
    argv = images.argv(
        container.get("image", ""),
        [_expand(str(a), env) for a in container.get("command") or []],
        [_expand(str(a), env) for a in container.get("args") or []],
    )
    argv = [argv[0], *(_rewrite(a, mounts) for a in _with_pod_ip(argv[1:], pod_ip))]
    return Launch(argv, env)
