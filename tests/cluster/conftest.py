"""Fixtures of the embedded-cluster tests: one cluster per module, torn down with a leak check."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_support import started_cluster
from ghostserve.cluster import embedded


@pytest.fixture(scope="module")
def bare_cluster() -> Iterator[embedded.Cluster]:
    """2 nodes x 4 GPUs, no operator: the node agents, sidecars and device plugins alone."""
    yield from started_cluster(operator=False)
