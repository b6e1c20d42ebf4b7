"""How the node agent turns a pod's container into a local command line (pure)."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import pytest
from ghostserve.cluster import containers

ROOT = pathlib.Path("/tmp/gs-node-0")
KUBECONFIG = pathlib.Path("/tmp/kubeconfig")


def engine_pod(image: str = "ghostserve/reference-engine:dev", **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "m-r0", "namespace": "default", "uid": "u1"},
        "spec": {
            "nodeName": "node-0",
            "containers": [
                {
                    "name": "engine",
                    "image": image,
                    "args": ["--model-path", "ghostserve/tiny-llama", "--host", "0.0.0.0", "--port", "30000"],
                    "env": [
                        {"name": "GHOSTSERVE_SIDECAR", "value": "unix:///run/ghostserve/sidecar.sock"},
                        {
                            "name": "GHOSTSERVE_POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        {
                            "name": "GHOSTSERVE_NODE_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                        },
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    ],
                    "volumeMounts": [
                        {"name": "ghostserve-sidecar", "mountPath": "/run/ghostserve"},
                        {"name": "ghostserve-pools", "mountPath": "/dev/shm"},
                    ],
                    **container,
                }
            ],
            "volumes": [
                {"name": "ghostserve-sidecar", "hostPath": {"path": "/run/ghostserve", "type": "Directory"}},
                {
                    "name": "ghostserve-pools",
                    "hostPath": {"path": "/dev/shm/ghostserve", "type": "Directory"},
                },
            ],
        },
        "status": {"podIP": "127.9.20.3"},
    }


def launch(pod: dict[str, Any], **kw: Any) -> containers.Launch:
    return containers.launch(
        pod,
        images=kw.pop("images", containers.ImageTable()),
        node_root=ROOT,
        device_env={"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b", "CUDA_VISIBLE_DEVICES": "0,1"},
        kubeconfig=KUBECONFIG,
    )


def test_reference_image_runs_the_serving_entry_point_on_the_pod_ip() -> None:
    got = launch(engine_pod())
    assert got.argv[:3] == [sys.executable, "-m", "ghostserve.engine.reference.serve"]
    assert got.argv[3:] == [
        "--model-path",
        "ghostserve/tiny-llama",
        "--host",
        "127.9.20.3",
        "--port",
        "30000",
    ]


def test_env_resolves_field_refs_maps_the_socket_dir_and_adds_devices() -> None:
    env = launch(engine_pod()).env
    assert env["GHOSTSERVE_SIDECAR"] == f"unix://{ROOT}/run/ghostserve/sidecar.sock"
    assert (env["GHOSTSERVE_POD_NAME"], env["GHOSTSERVE_NODE_NAME"], env["POD_IP"]) == (
        "m-r0",
        "node-0",
        "127.9.20.3",
    )
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-a,GPU-b" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["KUBECONFIG"] == str(KUBECONFIG)
    assert not any(k.startswith("GHOSTSERVE_") and k not in {
        "GHOSTSERVE_SIDECAR", "GHOSTSERVE_POD_NAME", "GHOSTSERVE_NODE_NAME"} for k in env)  # fmt: skip


def test_shm_mount_is_not_rewritten() -> None:
    mounts = containers.host_paths(engine_pod(), engine_pod()["spec"]["containers"][0], ROOT)
    assert mounts == {"/run/ghostserve": ROOT / "run/ghostserve"}


def test_sglang_image_runs_launch_server_or_fails_clearly(tmp_path: pathlib.Path) -> None:
    missing = containers.ImageTable(sglang_python=tmp_path / "nope")
    with pytest.raises(containers.ContainerError, match="setup-sglang") as err:
        launch(engine_pod("lmsysorg/sglang:v0.5"), images=missing)
    assert err.value.reason == "ErrImagePull"
    fake = tmp_path / "python"
    fake.write_text("")
    got = launch(engine_pod("lmsysorg/sglang:v0.5", command=["python3", "-m", "sglang.launch_server"]),
                 images=containers.ImageTable(sglang_python=fake))  # fmt: skip
    assert got.argv[:3] == [str(fake), "-m", "sglang.launch_server"]


def test_operator_image_runs_the_ghostserve_cli() -> None:
    pod = engine_pod(
        "ghcr.io/ghostserve/ghostserve:0.1.0", command=["ghostserve", "gateway"], args=["--listen", "x"]
    )
    assert launch(pod).argv == [sys.executable, "-m", "ghostserve.cli.main", "gateway", "--listen", "x"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"image": "nginx:latest"}, "ErrImagePull"),
        ({"command": ["/bin/sh"]}, "CreateContainerError"),
        (
            {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            "CreateContainerConfigError",
        ),
        (
            {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.schedulerName"}}}]},
            "CreateContainerConfigError",
        ),
        ({"volumeMounts": [{"name": "missing", "mountPath": "/x"}]}, "CreateContainerConfigError"),
    ],
)
def test_what_cannot_run_here_is_refused_with_the_kubelet_reason(change: dict[str, Any], reason: str) -> None:
    pod = engine_pod()
    pod["spec"]["containers"][0].update(change)
    with pytest.raises(containers.ContainerError) as err:
        launch(pod)
    assert err.value.reason == reason


def test_dollar_references_expand_and_listen_addresses_bind_the_pod_ip() -> None:
    pod = engine_pod("ghcr.io/ghostserve/ghostserve:0.1.0", command=["ghostserve", "gateway"])
    container = pod["spec"]["containers"][0]
    container["args"] = [
        "--listen",
        "0.0.0.0:8000",
        "--name=$(GHOSTSERVE_POD_NAME)",
        "--x=$(UNSET)",
        "--bind=0.0.0.0",
    ]
    assert launch(pod).argv[4:] == [
        "--listen",
        "127.9.20.3:8000",
        "--name=m-r0",
        "--x=$(UNSET)",
        "--bind=127.9.20.3",
    ]
