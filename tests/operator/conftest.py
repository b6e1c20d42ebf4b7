"""Fixtures of the operator tests: an emulated cluster with three 4-GPU nodes, each with its own
loopback IP and its own sidecar stand-in."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.operator import harness


@pytest.fixture
def cluster() -> Iterator[harness.Cluster]:
    yield from harness.cluster_of(3, gpus=4)


@pytest.fixture
def operator(cluster: harness.Cluster, tmp_path: pathlib.Path) -> Iterator[harness.OperatorProcess]:
    """A real `ghostserve operator` process with metrics and liveness endpoints."""
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    metrics, liveness = harness.free_port(), harness.free_port()
    proc = harness.OperatorProcess(
        kubeconfig,
        tmp_path / "operator.log",
        "--metrics-port",
        str(metrics),
        "--liveness",
        f"http://127.0.0.1:{liveness}/healthz",
        sidecar_port=cluster.sidecar_port,
    )
    proc.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    proc.liveness_url = f"http://127.0.0.1:{liveness}/healthz"
    yield proc
    proc.stop()
    print(proc.output()[-20000:])
