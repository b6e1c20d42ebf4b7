"""The simulated nodes without the operator: node agent, device plugin, per-node sidecar, fake GPUs."""

from __future__ import annotations

import json
import os
import pathlib
import textwrap
from typing import Any

import pytest
from cluster_support import pid_alive, still_running
from ghostserve.cluster import api, embedded
from ghostserve.v1 import sidecar_pb2 as pb

PODS, NODES = api.PODS, api.NODES


def python_pod(
    name: str, code: str, *, gpus: int = 0, node: str | None = None, **spec: Any
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "python:3.11",
        "command": ["python", "-c", textwrap.dedent(code)],
        "env": [
            {"name": "SOCK", "value": "unix:///run/ghostserve/sidecar.sock"},
            {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "volumeMounts": [{"name": "sock", "mountPath": "/run/ghostserve"}],
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    body: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "sock", "hostPath": {"path": "/run/ghostserve", "type": "Directory"}}],
        **spec,
    }
    if node:
        body["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": body}


def phase(c: embedded.Cluster, name: str) -> str | None:
    pod = c.get(PODS, name)
    return ((pod or {}).get("status") or {}).get("phase")


def log_of(c: embedded.Cluster, name: str) -> str:
    pod = c.get(PODS, name)
    assert pod is not None
    root = c.nodes[pod["spec"]["nodeName"]].spec.root
    logs = list(root.glob(f"var/lib/kubelet/pods/default_{name}_{pod['metadata']['uid']}/container.log"))
    return logs[0].read_text() if logs else ""


def wait_line(c: embedded.Cluster, name: str, marker: str) -> str:
    """The first log line of the pod that starts with `marker` (polled: logs are files, not API writes)."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log_of(c, name).splitlines():
            if line.startswith(marker):
                return line[len(marker) :]
        time.sleep(0.1)
    raise AssertionError(f"{name}: no {marker!r} line; log:\n{log_of(c, name)}")


def delete_and_wait(c: embedded.Cluster, name: str) -> None:
    c.delete(PODS, name)
    c.wait_for(lambda: c.get(PODS, name) is None, timeout=60, what=f"{name} removed")


def test_a_pod_gets_its_gpus_volumes_and_field_refs(bare_cluster: embedded.Cluster) -> None:
    c = bare_cluster
    code = """
        import json, os, time
        sock = os.environ["SOCK"][len("unix://"):]
        print("ENV" + json.dumps({k: os.environ.get(k) for k in
              ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ME", "GHOSTSERVE_FAKE_GPU_DIR")}
              | {"socket": os.path.exists(sock)}), flush=True)
        time.sleep(600)
    """
    c.apply(python_pod("env-a", code, gpus=2, node="node-0"))
    c.apply(python_pod("env-b", code, gpus=2, node="node-1"))
    got = {n: json.loads(wait_line(c, n, "ENV")) for n in ("env-a", "env-b")}
    for name, node in (("env-a", "node-0"), ("env-b", "node-1")):
        uuids = got[name]["NVIDIA_VISIBLE_DEVICES"].split(",")
        assert uuids == c.gpu_uuids(node)[:2]
        assert got[name]["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert got[name]["ME"] == name and got[name]["socket"] is True
        assert got[name]["GHOSTSERVE_FAKE_GPU_DIR"] == str(c.nodes[node].spec.fake_gpu_dir)
    assert not set(c.gpu_uuids("node-0")) & set(c.gpu_uuids("node-1"))
    pod = c.get(PODS, "env-a")
    assert pod is not None and pod["status"]["hostIP"] == c.nodes["node-0"].spec.ip
    assert pod["status"]["podIP"] != c.get(PODS, "env-b")["status"]["podIP"]  # type: ignore[index]
    reasons = [e["reason"] for e in c.events() if e["involvedObject"]["name"] == "env-a"]
    assert reasons[:2] == ["Scheduled", "Started"]
    delete_and_wait(c, "env-a")
    delete_and_wait(c, "env-b")


def test_deleting_a_pod_kills_its_whole_process_tree(bare_cluster: embedded.Cluster) -> None:
    c = bare_cluster
    code = """
        import os, subprocess, sys, time
        sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
        child = subprocess.Popen(sleeper, start_new_session=True)
        signal_proof = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        print(f"PIDS{os.getpid()},{child.pid},{signal_proof.pid}", flush=True)
        time.sleep(600)
    """
    pod = python_pod("tree", code, terminationGracePeriodSeconds=1)
    c.apply(pod)
    pids = [int(p) for p in wait_line(c, "tree", "PIDS").split(",")]
    assert all(pid_alive(p) for p in pids)
    delete_and_wait(c, "tree")
    assert not still_running(pids)


def test_exit_codes_and_restarts_are_reported(bare_cluster: embedded.Cluster) -> None:
    c = bare_cluster
    c.apply(python_pod("fails", "import sys; sys.exit(3)"))
    c.wait_for(lambda: phase(c, "fails") == "Failed", what="Failed")
    status = c.get(PODS, "fails")["status"]["containerStatuses"][0]  # type: ignore[index]
    assert status["state"]["terminated"]["exitCode"] == 3 and status["restartCount"] == 0
    c.apply(python_pod("again", "import sys; sys.exit(1)", restartPolicy="Always"))

    def restarts() -> int:
        pod = c.get(PODS, "again") or {}
        return int(((pod.get("status") or {}).get("containerStatuses") or [{}])[0].get("restartCount", 0))

    c.wait_for(lambda: restarts() >= 2, what="two restarts")
    last = c.get(PODS, "again")["status"]["containerStatuses"][0]["lastState"]  # type: ignore[index]
    assert last["terminated"]["exitCode"] == 1
    delete_and_wait(c, "again")
    delete_and_wait(c, "fails")


def test_ready_only_once_the_readiness_probe_passes(
    bare_cluster: embedded.Cluster, tmp_path: pathlib.Path
) -> None:
    c = bare_cluster
    go = tmp_path / "go"
    code = f"""
        import http.server, os, pathlib, time
        print("UP", flush=True)
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.05)
        ip = os.environ["POD_IP"]
        http.server.HTTPServer((ip, 30000), http.server.SimpleHTTPRequestHandler).serve_forever()
    """
    pod = python_pod("probed", code)
    container = pod["spec"]["containers"][0]
    container["env"].append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    container["ports"] = [{"name": "http", "containerPort": 30000}]
    container["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    c.apply(pod)
    wait_line(c, "probed", "UP")

    def ready() -> bool:
        conds = (c.get(PODS, "probed") or {}).get("status", {}).get("conditions") or []
        return any(x["type"] == "Ready" and x["status"] == "True" for x in conds)

    assert phase(c, "probed") == "Running" and not ready()
    go.touch()
    c.wait_for(ready, what="Ready")
    delete_and_wait(c, "probed")


def test_a_fatal_gpu_fault_lowers_allocatable_and_the_gpu_is_never_given_again(
    bare_cluster: embedded.Cluster,
) -> None:
    c = bare_cluster
    def allocatable() -> str:
        return str(c.get(NODES, "node-1")["status"]["allocatable"]["nvidia.com/gpu"])  # type: ignore[index]

    c.inject_gpu_fault("node-1", 2, kind="RETIRED_PAGES")  # not fatal: nothing changes
    c.inject_gpu_fault("node-1", 0, kind="XID", xid=79)
    c.wait_for(lambda: allocatable() == "3", what="allocatable 3")
    node = c.get(NODES, "node-1")
    assert node is not None and node["status"]["capacity"]["nvidia.com/gpu"] == "4"
    # A rank on the broken GPU fails like a CUDA process (devices.Device, exit 4).
    rank = """
        import time
        from ghostserve.engine.reference import devices
        dev = devices.Device.for_rank(0)
        print("GPU" + dev.uuid, flush=True)
        while True:
            try:
                dev.check()
            except devices.DeviceError as exc:
                print(exc, flush=True)
                raise SystemExit(devices.EXIT_DEVICE_ERROR)
            time.sleep(0.05)
    """
    c.apply(python_pod("three", rank, gpus=3, node="node-1"))
    c.wait_for(lambda: phase(c, "three") == "Running", what="three running")
    assert wait_line(c, "three", "GPU") == c.gpu_uuids("node-1")[1]
    c.apply(python_pod("one-more", "import time; time.sleep(600)", gpus=1, node="node-1"))
    c.wait_for(
        lambda: any(
            e["reason"] == "FailedScheduling" and e["involvedObject"]["name"] == "one-more"
            for e in c.events()
        ),
        what="FailedScheduling",
    )
    assert c.get(PODS, "one-more")["spec"].get("nodeName") is None  # type: ignore[index]
    c.inject_gpu_fault("node-1", 1, kind="ECC_DOUBLE_BIT")
    c.wait_for(lambda: phase(c, "three") == "Failed", what="rank on the broken GPU fails")
    term = c.get(PODS, "three")["status"]["containerStatuses"][0]["state"]["terminated"]  # type: ignore[index]
    assert term["exitCode"] == 4
    assert "ECC_DOUBLE_BIT" in log_of(c, "three")
    delete_and_wait(c, "three")
    delete_and_wait(c, "one-more")


def test_a_restarted_sidecar_still_reports_the_broken_gpu(bare_cluster: embedded.Cluster) -> None:
    c = bare_cluster
    starts = c.kill_sidecar("node-1")
    c.wait_for(lambda: c.nodes["node-1"].sidecar_starts > starts, what="sidecar restarted")
    with c.sidecar_client("node-1") as side:
        side.wait_ready(timeout=30)
        events = []
        stream = side.watch_health(initial_state=True, timeout=10)
        for event in stream:
            events.append(event)
            if len(events) == 4:
                stream.cancel()  # type: ignore[attr-defined]  # a grpc call: the stubs type it an iterator
                break
    fatal = {e.gpu_uuid: pb.HealthKind.Name(e.kind) for e in events if e.fatal}
    uuids = c.gpu_uuids("node-1")
    assert fatal == {uuids[0]: "XID", uuids[1]: "ECC_DOUBLE_BIT"}
    assert c.get(NODES, "node-1")["status"]["allocatable"]["nvidia.com/gpu"] == "2"  # type: ignore[index]


def test_inject_fault_rejects_a_gpu_the_node_does_not_have(bare_cluster: embedded.Cluster) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        bare_cluster.inject_gpu_fault("node-0", 4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert os.path.isdir(bare_cluster.nodes["node-0"].spec.fake_gpu_dir / "faults")
    assert not list((bare_cluster.nodes["node-0"].spec.fake_gpu_dir / "faults").iterdir())
