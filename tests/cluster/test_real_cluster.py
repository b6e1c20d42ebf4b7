"""The device-fault scenario against a real cluster (kind or minikube with GPUs; docs/kubernetes.md).

Runs only with GHOSTSERVE_KUBECONFIG set (skipped cleanly otherwise). The cluster must run the chart
with the sidecars' fake health backend (InjectFault needs it) and the operator, and:

- GHOSTSERVE_GSD: a GhostServeDeployment manifest to apply (its engine must be a ghostserve-enabled
  image; TP >= 2 so one rank can lose its GPU);
- GHOSTSERVE_GATEWAY_URL: the deployment's gateway as this machine reaches it (kubectl port-forward);
- GHOSTSERVE_SIDECAR_PORT (default 7443): the sidecars' TCP port on each node's InternalIP (plain TCP).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
from typing import Any

import grpc
import pytest
import yaml

KUBECONFIG = os.environ.get("GHOSTSERVE_KUBECONFIG")
pytestmark = pytest.mark.skipif(not KUBECONFIG, reason="GHOSTSERVE_KUBECONFIG not set: no real cluster given")
GROUP, VERSION, PLURAL = "ghostserve.io", "v1alpha1", "ghostservedeployments"


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} not set (see this module's docstring)")
    return value


async def _api(call: Any) -> Any:
    from kubernetes_asyncio import client, config

    await config.load_kube_config(config_file=KUBECONFIG)
    async with client.ApiClient() as api:
        return await call(client.CoreV1Api(api), client.CustomObjectsApi(api))


def _status(ns: str, name: str) -> dict[str, Any]:
    async def get(_core: Any, custom: Any) -> Any:
        return await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    return dict(asyncio.run(_api(get)).get("status") or {})


def _wait(check: Any, what: str, timeout: float = 900.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(2)  # a real API server: polled (the embedded tier waits on its write events)
    raise AssertionError(f"timed out waiting for {what}")


def test_device_fault_on_a_real_cluster_resumes_with_identical_tokens() -> None:
    from ghostserve.cluster import traffic
    from ghostserve.sidecar import client as sidecar_client

    manifest = yaml.safe_load(pathlib.Path(_env("GHOSTSERVE_GSD")).read_text())
    url = _env("GHOSTSERVE_GATEWAY_URL")
    port = int(os.environ.get("GHOSTSERVE_SIDECAR_PORT", "7443"))
    ns, name = manifest["metadata"].get("namespace", "default"), manifest["metadata"]["name"]

    async def apply(_core: Any, custom: Any) -> None:
        await custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)

    asyncio.run(_api(apply))
    _wait(lambda: _status(ns, name).get("phase") == "Serving", "Serving")
    asyncio.run(traffic.wait_healthy(url))

    def streams(tag: str) -> list[traffic.Stream]:
        return traffic.make_streams(
            2, prompt_tokens=512, new_tokens=32, vocab=1000, seed=5, tag=f"{name}-{tag}"
        )

    reference = streams("ref")
    asyncio.run(traffic.run(url, reference))
    rows = _status(ns, name).get("ranks") or []
    victim = next(r for r in rows if r.get("rank") == 1)

    async def node_ip(core: Any, _custom: Any) -> str:
        node = await core.read_node(victim["node"])
        return next(a.address for a in node.status.addresses if a.type == "InternalIP")

    address = f"{asyncio.run(_api(node_ip))}:{port}"
    gpus: dict[str, int] = {}
    with sidecar_client.SidecarClient(address, timeout=10.0) as side:
        try:  # the current state of every GPU comes first; the stream then waits for news until the deadline
            for event in side.watch_health(initial_state=True, timeout=3):
                gpus[event.gpu_uuid] = event.gpu_index
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    before = int(_status(ns, name).get("recoveries") or 0)
    run = streams("run")

    async def go() -> None:
        async def fault() -> None:
            while not all(len(s.tokens) >= 16 for s in run):
                await asyncio.sleep(0.05)
            with sidecar_client.SidecarClient(address, timeout=10.0) as side:
                from ghostserve.v1 import sidecar_pb2 as pb

                side.inject_fault(
                    gpu_index=gpus[victim["gpu"]], kind=pb.HealthKind.XID, xid=79, message="test"
                )

        await asyncio.gather(traffic.run(url, run), fault())

    asyncio.run(go())
    assert [s.tokens for s in run] == [s.tokens for s in reference]
    last = _wait(
        lambda: (
            (st := _status(ns, name)).get("recoveries", 0) > before
            and not st.get("inFlight")
            and st["lastRecovery"]
        ),
        "the recovery recorded",
    )
    assert (
        last["kind"] == "device" and last["outcome"] == "Succeeded" and last.get("kv") in {"Rebuilt", "Moved"}
    )
