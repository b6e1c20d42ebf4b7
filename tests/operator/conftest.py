"""Fixtures of the operator tests: an emulated cluster with three 4-GPU nodes, each with its own
loopback IP and its own sidecar stand-in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.operator import harness


@pytest.fixture
def cluster() -> Iterator[harness.Cluster]:
    with harness.Cluster() as c:
        for i in range(3):
            c.add_node(f"n{i}", gpus=4)
        yield c
