"""Shared pieces of the embedded-cluster tests (a uniquely named module: conftest names clash)."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterator

from ghostserve.cluster import embedded
from proc_exit import still_running


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def started_cluster(**options: object) -> Iterator[embedded.Cluster]:
    """Start a cluster; after the module: stop it and assert nothing it started is left."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gs-cl-", dir="/tmp"))
    cluster = embedded.Cluster(embedded.Options(workdir=workdir, **options))  # type: ignore[arg-type]
    cluster.start()
    pids: set[int] = set()
    try:
        yield cluster
    finally:
        pids |= set(cluster.pod_processes())
        pids |= {n.sidecar.pid for n in cluster.nodes.values() if n.sidecar and n.sidecar.pid}
        if cluster.operator and cluster.operator.pid:
            pids.add(cluster.operator.pid)
        cluster.stop()  # raises when /dev/shm segments were left behind
        left = still_running(pids)
        assert not left, f"processes left running: {left}"
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


