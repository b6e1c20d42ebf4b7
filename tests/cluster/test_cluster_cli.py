"""`ghostserve cluster` as a user runs it: up, reachable with a Python Kubernetes client, torn down clean."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from cluster_support import still_running


def _descendants(pid: int) -> list[int]:
    from ghostserve.cluster import processes

    return processes.descendants(pid)


def test_cluster_command_serves_a_kubeconfig_and_leaves_nothing_behind(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "out.log"
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gs-cli-", dir="/tmp"))  # Unix socket paths are short
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ghostserve.cli.main", "cluster", "--no-operator",
             "--nodes", "2", "--gpus", "2", "--workdir", str(workdir),
             "--ip-prefix", f"127.{os.getpid() % 200 + 20}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "embedded cluster up" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        kubeconfig = workdir / "kubeconfig"
        assert str(kubeconfig) in log.read_text()
        children = _descendants(proc.pid)
        assert len(children) >= 2  # the two nodes' sidecars

        async def nodes() -> dict[str, str]:
            from kubernetes_asyncio import client, config

            await config.load_kube_config(config_file=str(kubeconfig))
            async with client.ApiClient() as api:
                found = await client.CoreV1Api(api).list_node()
                return {n.metadata.name: n.status.allocatable.get("nvidia.com/gpu", "0") for n in found.items}

        assert asyncio.run(nodes()) == {"control-plane": "0", "node-0": "2", "node-1": "2"}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 0, log.read_text()
    assert "nothing left running" in log.read_text()
    assert not still_running(children)
    assert "left behind" not in log.read_text()  # the teardown names any /dev/shm segment it had to remove
    shutil.rmtree(workdir, ignore_errors=True)
